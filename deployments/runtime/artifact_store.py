"""Where compiled-artifact files are shared between nodes: a directory (a filesystem mounted on every
node) or an S3-compatible bucket, the same kind of store the image store writes to (through obstore).

Every node also keeps its own copy under its cache directory (`compile_cache.CompileCache`); a shared
store is what makes a new node start warm. Files are whole objects named by their key's digest:
a reader gets a complete file or none (a local write is a rename, an S3 PUT is atomic), so two
replicas writing the same file at once leave one valid file.

Credentials for a bucket come only from the replicas' environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, a web identity token or an instance role), never from args: the options
below refuse any other field.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator


class S3Location(BaseModel):
    """A bucket and prefix; `endpoint_url` for MinIO, Ceph, R2 ... (path-style requests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    prefix: str = "zimage-compile"
    endpoint_url: str | None = Field(None, pattern=r"^https?://")
    region: str | None = None
    virtual_hosted_style: bool = False
    timeout_s: float = Field(120.0, gt=0, le=3600)
    """For one whole file (a few hundred MB for the DiT); connecting gives up after 5 s."""


class SharedCompileCache(BaseModel):
    """`compile_cache`: one of `directory` or `s3`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str | None = None
    """A filesystem mounted at this path on every node (NFS, EFS, a ReadWriteMany volume)."""
    s3: S3Location | None = None

    @model_validator(mode="after")
    def _one_place(self):
        if (self.directory is None) == (self.s3 is None):
            raise ValueError("compile_cache takes one of `directory` (a shared filesystem) or `s3` (a bucket)")
        return self


class StoreUnavailable(OSError):
    """The store could not be read or written (unreachable, refused, not writable)."""


class ArtifactStore(Protocol):
    where: str  # for logs: a path or an s3:// URL

    def get(self, name: str) -> bytes | None:
        """The file's bytes; None when there is none; `StoreUnavailable` when the store failed."""

    def put(self, name: str, data: bytes) -> None:
        """Writes the whole file, replacing any other; `StoreUnavailable` when the store failed."""

    def names(self) -> dict[str, int]:
        """Every file's name and size."""


class DirectoryStore:
    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory).expanduser()
        self.where = str(self.directory)

    def get(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no such file (or no such directory)
            return None
        except OSError as exc:
            raise StoreUnavailable(f"{self.directory / name}: {exc}") from exc

    def put(self, name: str, data: bytes) -> None:
        """To a temporary name of this writer's own, then renamed over the file (atomic on POSIX)."""
        path = self.directory / name
        tmp = path.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreUnavailable(f"{path}: {exc}") from exc

    def names(self) -> dict[str, int]:
        if not self.directory.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in self.directory.iterdir() if p.suffix == ".bin" and p.is_file()}


class S3Store:
    def __init__(self, location: S3Location):
        from obstore.store import S3Store as ObjectStore

        config = {"virtual_hosted_style_request": location.virtual_hosted_style}
        if location.endpoint_url:
            config["endpoint"] = location.endpoint_url
        if location.region:
            config["region"] = location.region
        client = {"timeout": f"{location.timeout_s:g}s", "connect_timeout": "5s",
                  "allow_http": bool(location.endpoint_url and location.endpoint_url.startswith("http://"))}
        retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=location.timeout_s),
                 "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=2)}}
        self.store = ObjectStore(location.bucket, prefix=location.prefix.strip("/") or None, config=config,
                                 client_options=client, retry_config=retry)
        self.where = f"s3://{location.bucket}/{location.prefix.strip('/')}"

    def get(self, name: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self.store, name).bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:  # obstore's errors: network, auth, missing bucket
            raise StoreUnavailable(f"{self.where}/{name}: {_first_line(exc)}") from exc

    def put(self, name: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self.store, name, data, use_multipart=len(data) > 64 << 20)
        except Exception as exc:
            raise StoreUnavailable(f"{self.where}/{name}: {_first_line(exc)}") from exc

    def names(self) -> dict[str, int]:
        import obstore

        try:
            return {meta["path"]: meta["size"] for batch in obstore.list(self.store) for meta in batch}
        except Exception as exc:
            raise StoreUnavailable(f"{self.where}: {_first_line(exc)}") from exc


def shared_store(config: SharedCompileCache | None) -> ArtifactStore | None:
    if config is None:
        return None
    return DirectoryStore(config.directory) if config.directory is not None else S3Store(config.s3)


def _first_line(exc: BaseException) -> str:
    """obstore's messages name the operation and status, never the credentials; the first line will do."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
