"""What makes a file of compiled artifacts valid, and the file itself: a header naming that key, then
torch's mega-cache bytes (`torch.compiler.save_cache_artifacts`).

A file is named by its key's digest, so caches for other models, precisions, kernels, library
versions or GPU kinds sit side by side in one store (a rollout's old and new versions both start
warm). The header repeats the whole key and the payload's SHA-256: a file copied under the wrong
name, truncated or corrupted is refused before torch reads a byte of it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

MAGIC = b"zimage-compile-cache 1\n"
LIBRARIES = ("torch", "diffusers", "transformers", "triton")


class CacheFileError(ValueError):
    """The bytes are not a valid artifact file for the key asked for: the message says why."""


def library_versions() -> dict[str, str]:
    """Installed versions, read from the packages' metadata (nothing is imported)."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "none"
    return found


def device_kind() -> str:
    """The GPU's name and compute capability (generated kernels are built for them), or the CPU's
    architecture and the vector ISA torch uses (inductor's C++ kernels are built for it)."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} sm{major}{minor} cuda{torch.version.cuda}"
    return f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


@dataclass(frozen=True)
class CacheKey:
    """One stage's compiled artifacts: its `artifact` name (`dit-fp8`, `vae`, `text_encoder`), the
    model and the stage's choices that shape its graphs (dtype, precision, kernels, attention), and
    what the compiled code was built with and for."""

    artifact: str
    identity: dict[str, str] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=library_versions)
    device: str = field(default_factory=device_kind)
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def file_name(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.artifact)
        return f"{safe}-{self.digest}.bin"


def pack(key: CacheKey, payload: bytes) -> bytes:
    """The file: magic line, one JSON header line (the key, the payload's size and SHA-256), payload."""
    header = {"key": key.as_dict(), "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def unpack(key: CacheKey, data: bytes) -> bytes:
    """The payload of `data` if it is a whole, intact file for exactly `key`; else `CacheFileError`."""
    if not data.startswith(MAGIC):
        raise CacheFileError("not a compile cache file (no header)")
    line_end = data.find(b"\n", len(MAGIC))
    if line_end < 0:
        raise CacheFileError("truncated header")
    try:
        header = json.loads(data[len(MAGIC):line_end])
    except ValueError as exc:
        raise CacheFileError(f"unreadable header: {exc}") from None
    if header.get("key") != key.as_dict():
        differs = sorted(k for k, v in key.as_dict().items() if (header.get("key") or {}).get(k) != v)
        raise CacheFileError(f"written for another key (differs in {', '.join(differs) or 'its fields'})")
    payload = data[line_end + 1:]
    if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CacheFileError(f"corrupt payload ({len(payload)} bytes, header says {header.get('bytes')})")
    return payload
