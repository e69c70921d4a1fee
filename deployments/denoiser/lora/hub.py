"""Adapters the operator maps from hub files: `lora_hub: {alias: "owner/repo[@revision][:path/file.safetensors]"}`.

A request still names only the alias. The file is fetched by `huggingface_hub.hf_hub_download` on the
replica that first needs it (the Denoiser's worker thread, off the step loop) into the hub cache
(`lora_hub_cache_dir`, else huggingface_hub's own: `HF_HUB_CACHE` / `HF_HOME`), and found there again
with `HF_HUB_OFFLINE=1` or while the hub is down. A failed fetch is remembered for `RETRY_AFTER_S`:
requests meanwhile get the same error at once rather than each waiting out huggingface_hub's retries
(a worker thread apiece). Without a file name the repository's
`pytorch_lora_weights.safetensors` is meant (the name diffusers' trainers write). An alias is resolved
once per process: pin `@revision` to a commit for a fixed file.

Failures are the request's to see: a file the hub says does not exist (no repository, revision or file,
or a gated/private one) is `LoraHubMissingError`, a 400 naming the alias; a hub that cannot be reached
with the file not cached (offline mode, network, the hub's 5xx) is `LoraHubUnavailableError`, a 503.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from deployments.denoiser.lora.errors import LoraHubMissingError, LoraHubUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
RETRY_AFTER_S = 30.0
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
_FILE = re.compile(r"^(?:[A-Za-z0-9_.-]+/)*[A-Za-z0-9_.-]+\.safetensors$")


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str = DEFAULT_FILE
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> HubFile:
        """`owner/repo`, `owner/repo:file.safetensors`, `owner/repo@revision:dir/file.safetensors`."""
        if not isinstance(spec, str):
            raise ValueError(f"a LoRA hub file is a string like 'owner/repo:file.safetensors', not {spec!r}")
        repo, _, filename = spec.strip().partition(":")
        repo, _, revision = repo.partition("@")
        filename = filename or DEFAULT_FILE
        if not _REPO.match(repo) or ".." in repo:
            raise ValueError(f"LoRA hub file {spec!r}: {repo!r} is not a hub repository id (owner/name)")
        if revision and (not _REVISION.match(revision) or ".." in revision):
            raise ValueError(f"LoRA hub file {spec!r}: bad revision {revision!r}")
        if not _FILE.match(filename) or ".." in filename.split("/"):
            raise ValueError(f"LoRA hub file {spec!r}: only .safetensors files are read, not {filename!r}")
        return cls(repo, filename, revision or None)

    def __str__(self) -> str:
        return f"{self.repo_id}{'@' + self.revision if self.revision else ''}:{self.filename}"


def parse_aliases(mapping: dict[str, str] | None, name_pattern: re.Pattern) -> dict[str, HubFile]:
    """The operator's aliases, checked at start-up: names as strict as file stems, specs well formed."""
    aliases = {}
    for name, spec in (mapping or {}).items():
        if not name_pattern.match(name):
            raise ValueError(f"LoRA alias {name!r} must match {name_pattern.pattern}")
        aliases[name] = HubFile.parse(spec)
    return aliases


class HubFetcher:
    """Local paths of the aliases' files, fetched once per process (thread-safe, one fetch per alias)."""

    def __init__(self, aliases: dict[str, HubFile], cache_dir: str | None = None, endpoint: str | None = None):
        self.aliases = aliases
        self.cache_dir = cache_dir
        self.endpoint = endpoint  # a hub mirror; None: huggingface_hub's (HF_ENDPOINT)
        self.retry_after_s = RETRY_AFTER_S
        self._paths: dict[str, Path] = {}
        self._failures: dict[str, tuple[float, Exception]] = {}
        self._locks = {name: threading.Lock() for name in aliases}

    def cached(self, name: str) -> Path | None:
        """The file if it is already on this node (no network): for listing and the Ingress's checks."""
        known = self._paths.get(name)
        if known is not None and known.exists():
            return known
        from huggingface_hub import try_to_load_from_cache

        hub = self.aliases[name]
        found = try_to_load_from_cache(hub.repo_id, hub.filename, cache_dir=self.cache_dir, revision=hub.revision)
        return Path(found) if isinstance(found, str) else None

    def fetch(self, name: str) -> Path:
        """The file on this node, downloaded on first use (blocking: call it off the event loop)."""
        known = self._paths.get(name)
        if known is not None and known.exists():
            return known
        with self._locks[name]:
            known = self._paths.get(name)
            if known is None or not known.exists():
                failed = self._failures.get(name)
                if failed is not None and time.monotonic() - failed[0] < self.retry_after_s:
                    raise failed[1]
                try:
                    known = self._paths[name] = self._download(name)
                except (LoraHubMissingError, LoraHubUnavailableError) as exc:
                    self._failures[name] = (time.monotonic(), exc)
                    raise
                self._failures.pop(name, None)
        return known

    def _download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HFValidationError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        hub = self.aliases[name]
        start = time.perf_counter()
        try:
            path = hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision, cache_dir=self.cache_dir,
                                   endpoint=self.endpoint)
        except LocalEntryNotFoundError as exc:  # offline, or the hub unreachable, and not cached
            logger.warning("LoRA %r (%s) is not cached and the hub cannot be reached: %s", name, hub, exc)
            raise LoraHubUnavailableError(name) from None
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
            logger.warning("LoRA %r (%s) does not exist on the hub: %s", name, hub, exc)
            raise LoraHubMissingError(name, type(exc).__name__) from None
        except Exception as exc:  # network errors, the hub's 5xx, a full disk: worth a retry
            logger.warning("LoRA %r (%s) could not be fetched: %s: %s", name, hub, type(exc).__name__, exc)
            raise LoraHubUnavailableError(name) from None
        logger.info("LoRA %r (%s) resolved in %.2fs: %s", name, hub, time.perf_counter() - start, path)
        return Path(path)
