"""The operator's adapters: a directory of `.safetensors` files, each usable under its file's stem.

A name is an alias the operator chose by naming the file; it must match `NAME_PATTERN` (no dots,
slashes or spaces), so a name from a request is only ever a key into the scanned index, never a path.
Files whose stems do not match are skipped (and logged). The index is rescanned when a name is missing
or the directory's mtime changed, so a file copied in while serving becomes usable without a restart;
a file replaced in place has another (size, mtime) and is read again. Caps: file size, rank, count.

Beside the directory, the operator may map aliases to hub files (`hub`, the app's `lora_hub`): each Denoiser
fetches such a file itself into its node's hub cache the first time a request needs it, so nodes share
nothing. An alias shadows a directory file of the same stem. The Ingress (`fetch_hub=False`) never
downloads: it lists and checks a hub alias from its header once the file is in its own node's cache.

On a cluster every node that runs a Denoiser or the Ingress reads the same directory: mount one shared
filesystem (NFS, a cloud file store, a synced volume) at `lora_dir` on each node, or use hub aliases.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deployments.denoiser.lora.adapter import LoraAdapter
from deployments.denoiser.lora.convert import metadata_scaling, read_safetensors, to_diffusers_keys
from deployments.denoiser.lora.errors import LoraFitError, LoraFormatError, UnknownLoraError
from deployments.denoiser.lora.hub import HubFetcher, parse_aliases

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def adapter_set_id(names) -> str:
    """The Ray Serve multiplexed model ID of a request's adapters: their sorted, de-duplicated names
    joined by "+" (scales change no weights, so they are not part of it). Requests with the same set go
    to replicas that have loaded it (`Denoiser.adapter_set`)."""
    return "+".join(sorted(set(names)))


class LoraSettings(BaseModel):
    """Where the adapters are and the caps on them (the builder's `lora_dir`, `lora_max_*` args)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_dir: str | None = None
    """None: `loras/` under ZIMAGE_CACHE_DIR (or the model cache's default)."""
    max_file_bytes: int = Field(1 << 30, ge=1)
    max_rank: int = Field(256, ge=1)
    max_files: int = Field(1000, ge=1)
    hub: dict[str, str] = Field(default_factory=dict)
    """Aliases of hub files: `{name: "owner/repo[@revision][:file.safetensors]"}` (the app's `lora_hub`)."""
    hub_cache_dir: str | None = None
    """Where hub files are cached; None: huggingface_hub's own cache (HF_HUB_CACHE, HF_HOME)."""

    def directory(self) -> Path:
        if self.lora_dir:
            return Path(self.lora_dir).expanduser()
        from deployments.weights.model_source import default_cache_dir

        return default_cache_dir() / "loras"


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    size: int
    mtime_ns: int

    @property
    def version(self) -> tuple[str, int, int]:
        return (self.name, self.size, self.mtime_ns)


@dataclass(frozen=True)
class LoraInfo:
    """What `GET /v1/loras` lists; `error` is set (and the rest empty) for a file that cannot be used."""

    name: str
    bytes: int
    rank: int = 0
    target_modules: tuple[str, ...] = ()
    error: str | None = None
    source: str = "directory"
    """`directory` or `hub`; a hub file not yet on this node has `fetched` False and no rank or bytes."""
    fetched: bool = True

    def as_dict(self) -> dict:
        data = {"name": self.name, "rank": self.rank, "target_modules": list(self.target_modules),
                "bytes": self.bytes, "source": self.source}
        if not self.fetched:
            data["fetched"] = False
        return data if self.error is None else {**data, "error": self.error}


class LoraLibrary:
    """The scanned index of the adapter directory, with header-only facts per file version."""

    def __init__(self, settings: LoraSettings | None = None, *, fetch_hub: bool = True, hub_endpoint: str | None = None):
        self.settings = settings or LoraSettings()
        self.directory = self.settings.directory()
        self.hub = HubFetcher(parse_aliases(self.settings.hub, NAME_PATTERN), self.settings.hub_cache_dir, hub_endpoint)
        self.fetch_hub = fetch_hub
        self._lock = threading.Lock()
        self._files: dict[str, LoraFile] = {}
        self._dir_mtime: int | None = None
        self._infos: dict[tuple[str, int, int], LoraInfo] = {}

    def _scan_locked(self) -> None:
        try:
            mtime = self.directory.stat().st_mtime_ns
        except FileNotFoundError:
            self._files, self._dir_mtime = {}, None
            return
        files: dict[str, LoraFile] = {}
        with os.scandir(self.directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                stem, ext = os.path.splitext(entry.name)
                if ext != ".safetensors" or not entry.is_file():
                    continue
                if not NAME_PATTERN.match(stem):
                    logger.warning("LoRA file %r skipped: its name must match %s", entry.name, NAME_PATTERN.pattern)
                    continue
                if len(files) >= self.settings.max_files:
                    logger.warning("LoRA directory holds over %d files; the rest are skipped", self.settings.max_files)
                    break
                stat = entry.stat()
                files[stem] = LoraFile(stem, Path(entry.path), stat.st_size, stat.st_mtime_ns)
        self._files, self._dir_mtime = files, mtime

    def _fresh(self) -> dict[str, LoraFile]:
        with self._lock:
            try:
                mtime = self.directory.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if mtime != self._dir_mtime or self._dir_mtime is None:
                self._scan_locked()
            return self._files

    def file(self, name: str) -> LoraFile | None:
        """The current file for `name`; rescans once on a miss. Raises UnknownLoraError. A hub alias is
        fetched (None when `fetch_hub` is off and the file is not on this node yet)."""
        if not NAME_PATTERN.match(name):
            raise UnknownLoraError(name)
        if name in self.hub.aliases:
            return self._hub_file(name)
        entry = self._fresh().get(name)
        if entry is None:
            with self._lock:
                self._scan_locked()
                entry = self._files.get(name)
        if entry is None:
            raise UnknownLoraError(name)
        try:  # replaced in place: same name, new size or mtime
            stat = entry.path.stat()
        except FileNotFoundError:
            raise UnknownLoraError(name) from None
        if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns):
            entry = LoraFile(name, entry.path, stat.st_size, stat.st_mtime_ns)
        return entry

    def _hub_file(self, name: str) -> LoraFile | None:
        """The alias's file on this node (None: not fetched, with `fetch_hub` off); a symlink into the
        hub cache's blobs, so the stat is the blob's."""
        path = self.hub.fetch(name) if self.fetch_hub else self.hub.cached(name)
        if path is None:
            return None
        stat = path.stat()
        return LoraFile(name, path, stat.st_size, stat.st_mtime_ns)

    def names(self) -> list[str]:
        return sorted(set(self._fresh()) | set(self.hub.aliases))

    def offers_any(self) -> bool:
        """Whether any adapter is on offer now (a file in the directory, or a hub alias): the Denoiser
        then captures the graphs with adapters after ready like the plain ones, else at the first two
        steps of a forward with adapters at each shape. An unreadable directory offers none."""
        try:
            return bool(self.names())
        except OSError:
            return False

    def _check_size(self, entry: LoraFile) -> None:
        if entry.size > self.settings.max_file_bytes:
            raise LoraFormatError(f"{entry.name}: {entry.size} bytes is over the server's cap of "
                                  f"{self.settings.max_file_bytes}")

    def info(self, name: str) -> LoraInfo:
        """Rank and targets from the file's header (weights are not read), cached per file version."""
        entry = self.file(name)
        source = "hub" if name in self.hub.aliases else "directory"
        if entry is None:
            return LoraInfo(name, 0, source=source, fetched=False)
        cached = self._infos.get(entry.version)
        if cached is not None:
            return cached
        try:
            self._check_size(entry)
            tensors, metadata = read_safetensors(entry.path, meta=True)
            adapter = LoraAdapter.from_state_dict(name, to_diffusers_keys(tensors), metadata_scaling(metadata),
                                                  self.settings.max_rank)
            info = LoraInfo(name, entry.size, adapter.rank, tuple(adapter.targets), source=source)
        except (LoraFormatError, LoraFitError) as exc:
            info = LoraInfo(name, entry.size, error=str(exc), source=source)
        self._infos[entry.version] = info
        return info

    def list(self) -> list[LoraInfo]:
        return [self.info(name) for name in self.names()]

    def load(self, name: str) -> tuple[LoraAdapter, LoraFile]:
        """The adapter's factors (CPU), converted and capped; not yet checked against a model."""
        entry = self.file(name)
        if entry is None:
            raise RuntimeError(f"LoRA {name!r}: a library built with fetch_hub=False does not load hub files")
        self._check_size(entry)
        tensors, metadata = read_safetensors(entry.path)
        state = to_diffusers_keys(tensors)
        return LoraAdapter.from_state_dict(name, state, metadata_scaling(metadata), self.settings.max_rank), entry
