"""Where compiled artifacts live: inductor's and Triton's on-disk caches and one-file mega-caches.

Shared by every stage that compiles (the DiT, the VAE decoder, the text encoder's layers).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def configure_compile_cache(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """Points inductor's and Triton's on-disk caches at `cache_dir` and switches every cache on.

    Caches (all keyed by graph, torch version and device, so sharing a directory is safe):
    FX graph cache (compiled graphs), AOTAutograd cache (the traced joint graph), local autotune
    cache, Triton kernel binaries. A second process with the same directory skips most of inductor's
    and Triton's work and pays mostly for dynamo tracing. Call before anything is compiled.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser().resolve()
        (path / "inductor").mkdir(parents=True, exist_ok=True)
        (path / "triton").mkdir(parents=True, exist_ok=True)
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
        if previous and previous != os.environ["TORCHINDUCTOR_CACHE_DIR"]:
            try:
                from torch._inductor.utils import clear_caches

                clear_caches()  # drop in-memory directory lookups made under the old path
            except ImportError:
                pass
    inductor_config = torch._inductor.config
    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    functorch_config = getattr(torch._functorch, "config", None)
    if functorch_config is not None and hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return path


def _artifact_file(cache_dir: str | os.PathLike[str], name: str) -> Path:
    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    tag = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{name}-torch{torch.__version__}-{device}")
    return Path(cache_dir).expanduser() / "mega" / f"{tag}.bin"


def load_compile_artifacts(cache_dir: str | os.PathLike[str] | None, name: str = "dit") -> bool:
    """Loads a mega-cache file written by `save_compile_artifacts` into the local caches.

    One file holds everything a warm-up compiled; copying it to a fresh node (or a shared path)
    gives that node warm caches without sharing the whole cache directory.
    """
    if cache_dir is None or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    file = _artifact_file(cache_dir, name)
    if not file.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(file.read_bytes())
    except Exception as exc:  # a stale or foreign file must never stop start-up
        logger.warning("ignoring compile artifacts %s: %s", file, exc)
        return False
    logger.info("loaded compile artifacts from %s: %s", file, info)
    return info is not None


def save_compile_artifacts(cache_dir: str | os.PathLike[str] | None, name: str = "dit") -> Path | None:
    """Writes everything compiled so far in this process to one file (atomic replace)."""
    if cache_dir is None or not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    try:
        result = torch.compiler.save_cache_artifacts()
    except Exception as exc:
        logger.warning("could not serialize compile artifacts: %s", exc)
        return None
    if not result:
        return None
    data, _info = result
    file = _artifact_file(cache_dir, name)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, file)
    return file


def raise_recompile_limit(limit: int = 64) -> None:
    config = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attr) and getattr(config, attr) < limit:
            setattr(config, attr, limit)
