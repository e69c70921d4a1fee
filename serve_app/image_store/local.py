"""A directory on the Ingress's node, served by the Ingress itself at `FILES_ROUTE<name>`.

- Writes are atomic: the bytes go to a temporary file (`.tmp-...`, which no valid name matches, so
  it is never served) and are renamed into place once complete and flushed.
- A name from a URL is matched against the strict pattern first; only a matched name is joined to
  the directory, so `..`, separators or absolute paths never reach the filesystem.
- Expired images are removed by `sweep` (the Ingress runs it periodically) and are 404s before that;
  temporary files left by a crash are removed too.
- A quota (`max_bytes`) bounds the directory: when a new image does not fit, expired images are
  swept first; if it still does not fit the request is refused (StoreFull, a 503) rather than
  deleting images whose URLs are still valid.

Several Ingress replicas may share one directory (a network file system mounted on every node): names
are unique, writes atomic and sweeps idempotent. Each replica counts the quota from its last sweep's
scan plus its own writes since, so with sharing the quota is approximate between sweeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from pathlib import Path

from serve_app.image_store.base import (
    ImageName,
    ImageStore,
    StoredImage,
    StoreError,
    StoreFull,
    new_name,
    parse_name,
)

FILES_ROUTE = "/v1/images/files/"
TEMP_PREFIX = ".tmp-"
TEMP_MAX_AGE_S = 600  # a temporary file older than this was abandoned by a crashed writer


class LocalDirectoryStore(ImageStore):
    kind = "local"

    def __init__(self, directory: str | os.PathLike, ttl_s: float, max_bytes: int,
                 public_base_url: str | None = None, fsync: bool = True):
        self.root = Path(directory).expanduser().resolve()
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.fsync = fsync
        self._lock = threading.Lock()
        self._usage = 0  # bytes in finished images (from the last sweep's scan, plus writes and deletes since)
        self._pending = 0  # bytes reserved by this replica's writes in flight
        self._sweeps = 0  # sweeps scanning now
        self._written_in_sweep: list[tuple[str, int]] = []  # writes finished while a sweep scanned
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the image directory {self.root}: {exc.strerror}") from exc
        self._sweep_sync(time.time())

    # ---- writing -------------------------------------------------------------------------------

    async def put(self, data: bytes, fmt: str, request_base_url: str | None = None) -> StoredImage:
        name = new_name(fmt, self.ttl_s)
        await asyncio.to_thread(self._put_sync, name, data)
        return StoredImage(name.name, self.url_for(name.name, request_base_url), name.expires_at)

    def url_for(self, name: str, request_base_url: str | None = None) -> str:
        """`public_base_url` (the address clients reach, e.g. behind a proxy), else the base the
        request came in on; without either (the handle API) a path relative to the server."""
        base = self.public_base_url or (request_base_url or "").rstrip("/")
        return f"{base}{FILES_ROUTE}{name}"

    def _put_sync(self, name: ImageName, data: bytes) -> None:
        self._reserve(len(data))
        temp = self.root / f"{TEMP_PREFIX}{secrets.token_hex(16)}"
        try:
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                if self.fsync:
                    os.fsync(handle.fileno())
            os.replace(temp, self.root / name.name)
        except OSError as exc:
            self._settle(name.name, len(data), written=False)
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write to the image directory: {exc.strerror or exc}") from exc
        self._settle(name.name, len(data), written=True)

    def _reserve(self, size: int) -> None:
        """Counts `size` against the quota before a byte is written (in-flight writes included), so
        concurrent writers cannot overshoot it together."""
        for attempt in range(2):
            with self._lock:
                if self._usage + self._pending + size <= self.max_bytes:
                    self._pending += size
                    return
            if attempt == 0:
                self._sweep_sync(time.time())
        raise StoreFull(f"the image store is full ({self._usage + self._pending} of {self.max_bytes} bytes in "
                        "images that have not expired)")

    def _settle(self, name: str, size: int, written: bool) -> None:
        with self._lock:
            self._pending -= size
            if written:
                self._usage += size
                if self._sweeps:
                    self._written_in_sweep.append((name, size))

    def _release(self, size: int) -> None:
        with self._lock:
            self._usage = max(0, self._usage - size)

    # ---- reading (the Ingress's file route) ----------------------------------------------------

    async def read(self, name: str, now: float | None = None) -> tuple[bytes, ImageName] | None:
        """The image's bytes when `name` is valid, unexpired and present; else None (a 404)."""
        parsed = parse_name(name)
        if parsed is None or parsed.expired(now):
            return None
        return await asyncio.to_thread(self._read_sync, parsed)

    def _read_sync(self, parsed: ImageName) -> tuple[bytes, ImageName] | None:
        try:
            return (self.root / parsed.name).read_bytes(), parsed  # parsed.name matched NAME_PATTERN
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read from the image directory: {exc.strerror or exc}") from exc

    # ---- removing ------------------------------------------------------------------------------

    async def delete(self, name: str) -> None:
        parsed = parse_name(name)
        if parsed is not None:
            await asyncio.to_thread(self._unlink, self.root / parsed.name)

    def _unlink(self, path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        self._release(size)
        return 1

    async def sweep(self, now: float | None = None) -> int:
        return await asyncio.to_thread(self._sweep_sync, time.time() if now is None else now)

    def _sweep_sync(self, now: float) -> int:
        """Removes expired images and abandoned temporary files, and recounts the bytes in use."""
        removed, usage = 0, 0
        with self._lock:
            self._sweeps += 1
            first_write = len(self._written_in_sweep)
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            with self._lock:
                self._sweeps -= 1
            raise StoreError(f"cannot list the image directory: {exc.strerror or exc}") from exc
        for entry in entries:
            try:
                if entry.name.startswith(TEMP_PREFIX):
                    if now - entry.stat().st_mtime > TEMP_MAX_AGE_S:
                        os.unlink(entry.path)
                        removed += 1
                    continue  # otherwise being written: counted by its writer's reservation
                parsed = parse_name(entry.name)
                if parsed is None:
                    continue  # not ours: left alone
                if parsed.expired(now):
                    os.unlink(entry.path)
                    removed += 1
                else:
                    usage += entry.stat().st_size
                    seen.add(entry.name)
            except FileNotFoundError:
                continue  # another replica sharing the directory got there first
        with self._lock:  # a write that finished during the scan counts once, whether the scan saw it or not
            missed = sum(size for name, size in self._written_in_sweep[first_write:] if name not in seen)
            self._usage = usage + missed
            self._sweeps -= 1
            if not self._sweeps:
                self._written_in_sweep.clear()
        return removed

    @property
    def usage_bytes(self) -> int:
        return self._usage
