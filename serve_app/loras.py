"""The Ingress's side of LoRA adapters: the names a request may use (the operator's directory, read
through `deployments.denoiser.lora.library`), `GET /v1/loras`, and `loras` in an edit's multipart form.

A name is only ever a key into the directory's scanned index (a file stem matching a strict pattern)
or one of the operator's hub aliases, never a path. Whether a file's keys and shapes fit the model is
the Denoiser's check, at load time. The Ingress downloads nothing: a hub alias whose file is not on
its node yet passes here and is fetched by the Denoiser replica that serves it.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from deployments.denoiser.lora.errors import UnknownLoraError
from serve_app.errors import ApiError, bad_request

_INDEXED = re.compile(r"^loras\[(\d*)\]\[(name|scale)\]$")


class LoraCatalog:
    def __init__(self, settings: dict | None = None):
        from deployments.denoiser.lora.library import LoraLibrary, LoraSettings  # torch: the replica's

        self.library = LoraLibrary(LoraSettings(**(settings or {})), fetch_hub=False)

    def check(self, loras) -> None:
        """Every name is an adapter the server offers and whose file reads; else a 400 naming it."""
        for lora in loras:
            try:
                info = self.library.info(lora.name)
            except UnknownLoraError:
                raise ApiError(400, f"Unknown LoRA adapter '{lora.name}'; GET /v1/loras lists the adapters "
                                    "this server offers.", param="loras", code="lora_not_found") from None
            if info.error:
                raise bad_request(f"LoRA adapter '{lora.name}' cannot be used: {info.error}", param="loras",
                                  code="invalid_lora")

    async def check_plan(self, plan) -> None:
        if plan.loras:  # a directory scan and file headers: off the event loop
            await asyncio.to_thread(self.check, plan.loras)

    async def listing(self) -> dict[str, Any]:
        infos = await asyncio.to_thread(self.library.list)
        return {"object": "list", "data": [{"object": "lora", **info.as_dict()} for info in infos]}


def form_loras(items: list[tuple[str, str]]) -> list[dict] | str:
    """`loras` from multipart fields: a JSON string (`loras=[{"name": ..., "scale": ...}]`), or the
    official client's flattened `extra_body` (`loras[][name]`, `loras[][scale]`, each repeated; or
    indexed, `loras[0][name]`). Unindexed scales pair with names by position, so either every adapter
    has a scale or none has."""
    if len(items) == 1 and items[0][0] == "loras":
        try:
            return json.loads(items[0][1])
        except ValueError:
            raise bad_request("loras must be a JSON list of {\"name\", \"scale\"} objects.", param="loras") from None
    indexed: dict[int, dict] = {}
    names, scales = [], []
    for key, value in items:
        match = _INDEXED.match(key)
        if match is None:
            raise bad_request(f"Unrecognized request argument supplied: {key}", param="loras",
                              code="unknown_parameter")
        index, field = match.groups()
        if index:
            indexed.setdefault(int(index), {})[field] = value
        else:
            (names if field == "name" else scales).append(value)
    if names or scales:
        if scales and len(scales) != len(names):
            raise bad_request("Give every LoRA adapter a scale, or none.", param="loras")
        return [{"name": name, "scale": scales[i]} if scales else {"name": name} for i, name in enumerate(names)]
    return [indexed[i] for i in sorted(indexed)]
