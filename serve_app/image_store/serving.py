"""The Ingress's side of the image store: building it on a replica, storing a request's images,
serving the local store's files, and sweeping expired images in the background."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from serve_app.errors import ApiError, api_error_for, error_response
from serve_app.image_store import ImageStore, ImageStoreConfig, LocalDirectoryStore, build_store
from serve_app.image_store.config import ingress_replicas_problem
from serve_app.image_store.results import by_reference
from serve_app.protocol import ImageResult

logger = logging.getLogger("ray.serve")


def replica_store(config: dict[str, Any] | None) -> ImageStore:
    """The store of `args.image_store`, after checking this replica's final scaling: a Serve config
    file's `deployments` entry for the Ingress applies after the builder ran, so the builder's check
    of `args` cannot see it. A replica that could hand out URLs other replicas cannot serve refuses to
    start, and Serve reports the message as the deployment's failure."""
    parsed = ImageStoreConfig.model_validate(config or {})
    scaling = _own_scaling()
    if scaling is not None:
        problem = ingress_replicas_problem(parsed, *scaling)
        if problem:
            raise ValueError(problem)
    store = build_store(parsed)
    Sweeper(store).start()
    return store


def _own_scaling() -> tuple[Any, dict | None] | None:
    from ray import serve

    deployment_config = getattr(serve.get_replica_context(), "_deployment_config", None)
    if deployment_config is None:
        return None
    autoscaling = deployment_config.autoscaling_config
    limits = None if autoscaling is None else {"max_replicas": getattr(autoscaling, "max_replicas", 1)}
    return deployment_config.num_replicas, limits


def request_base_url(request: Request) -> str:
    """How the client reached us (scheme, host and Serve's route prefix): the local store's URLs
    point back there unless `public_base_url` says otherwise."""
    return str(request.base_url).rstrip("/")


async def stored(result: ImageResult, store: ImageStore, response_format: str | None,
                 base_url: str | None) -> ImageResult:
    """`result` as the client asked for it: unchanged for b64_json, by reference for url."""
    if response_format != "url":
        return result
    return await by_reference(result, store, base_url)


async def stored_stream(items: AsyncIterator, store: ImageStore, response_format: str | None,
                        base_url: str | None) -> AsyncIterator:
    """A stream's items with its final image stored before its event is sent (partials stay inline)."""
    try:
        async for item in items:
            yield await stored(item, store, response_format, base_url) if isinstance(item, ImageResult) else item
    finally:
        await items.aclose()


async def file_response(store: ImageStore, name: str) -> Response:
    """GET of a local-store image: its bytes, or a 404 in the OpenAI error shape for a name that is
    not one, not there or expired (the same answer for all three)."""
    try:
        found = await store.read(name) if isinstance(store, LocalDirectoryStore) else None
    except Exception as exc:  # the directory failed: a 503, never a 500 or a partial body
        return error_response(api_error_for(exc))
    if found is None:
        return error_response(ApiError(404, "No such image: the URL is wrong or has expired.",
                                       code="image_not_found"))
    data, parsed = found
    remaining = max(0, int(parsed.expires_at - time.time()))
    headers = {"Cache-Control": f"private, max-age={remaining}", "X-Content-Type-Options": "nosniff"}
    return Response(data, media_type=parsed.content_type, headers=headers)


class Sweeper:
    """Removes expired images every `store.sweep_interval_s` on a daemon thread of the replica; a
    failing sweep is logged and tried again next time."""

    def __init__(self, store: ImageStore):
        self.store = store

    def start(self) -> None:
        threading.Thread(target=self._loop, name="image-store-sweep", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.store.sweep_interval_s)
            try:
                removed = asyncio.run(self.store.sweep())
                if removed:
                    logger.info("image store: swept %d expired images", removed)
            except Exception as exc:
                logger.warning("image store: sweep failed: %s", exc)
