"""Where compiled artifacts live: inductor's and Triton's on-disk caches, and one file per stage of
everything its warm-up compiled (torch's mega-cache), kept on the node and, optionally, in a store
every node shares (`artifact_store`).

Shared by every stage that compiles (the DiT's regional compile, the VAE decoder, the text encoder's
layers). A stage passes a `CompileCache` wherever a cache directory is asked for: a path (inductor's
and Triton's caches go under it) that also carries what keys the stage's files (`cache_key.CacheKey`:
the model, the stage's choices, library versions, the GPU kind). At start, `load_compile_artifacts`
reads the stage's file (the node's copy, else the shared one) into torch's caches, so the warm-up's
graphs come from the FX-graph cache instead of being compiled; after the warm-ups,
`save_compile_artifacts` writes the file where it is missing or stale (something was compiled that
no file held), never replacing it with one that lacks an entry it had. A file for another key is
never loaded; a corrupt one is ignored with a warning and rewritten after the warm-ups. A cache directory that cannot be written, or a store that cannot be
reached, costs one warning and a start that compiles, never a failed start.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deployments.runtime.artifact_store import (
    ArtifactStore,
    DirectoryStore,
    SharedCompileCache,
    StoreUnavailable,
    shared_store,
)
from deployments.runtime.cache_key import CacheKey, pack, unpack
from deployments.runtime.compile_counters import CompileCounts

logger = logging.getLogger(__name__)


class CompileCache(os.PathLike):
    """A stage's compile cache: `directory` on this node (an `os.PathLike`, so it goes wherever a
    cache directory is asked for), `identity` (the model and the stage's choices, part of every file's
    key) and the `shared` store, if any."""

    def __init__(self, directory: str | os.PathLike[str], identity: dict[str, object] | None = None,
                 shared: SharedCompileCache | None = None):
        self.directory = Path(directory).expanduser()
        self.identity = {k: str(v) for k, v in (identity or {}).items()}
        self.shared = shared

    def __fspath__(self) -> str:
        return str(self.directory)

    def __repr__(self) -> str:
        return f"CompileCache({str(self.directory)!r}, {self.identity}, shared={self.shared})"

    def key(self, artifact: str) -> CacheKey:
        return CacheKey(artifact, self.identity)

    def stores(self) -> list[ArtifactStore]:
        """The node's own copy first, then the shared store."""
        shared = shared_store(self.shared)
        return [DirectoryStore(self.directory / "mega")] + ([shared] if shared is not None else [])


def as_cache(cache_dir: str | os.PathLike[str]) -> CompileCache:
    """A plain directory (benchmarks, tests) is a cache keyed by versions and device alone."""
    return cache_dir if isinstance(cache_dir, CompileCache) else CompileCache(cache_dir)


@dataclass
class ArtifactState:
    """One artifact file in this process: where it was loaded from and what was written since."""

    file: str
    cache: CompileCache
    loaded_from: str | None = None
    """The store whose copy was loaded; None: none was (absent, invalid or unreachable)."""
    entries: set[tuple[str, str]] | None = None
    """The entries of the file as loaded or last written (torch's CacheInfo)."""
    problems: list[str] = field(default_factory=list)
    written_to: list[str] = field(default_factory=list)
    baseline: CompileCounts = field(default_factory=CompileCounts)
    """Counts when the file was loaded or last written: a compile after it makes the file stale."""

    def as_dict(self) -> dict:
        return {"file": self.file, "loaded_from": self.loaded_from, "problems": list(self.problems),
                "written_to": list(self.written_to)}


_states: dict[str, ArtifactState] = {}
_warned: set[str] = set()
_uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile-cache-upload")
_pending: list[Future] = []
_lock = threading.Lock()
_rebuilding = False


def _warn_once(place: str, message: str, *args) -> None:
    """A directory or store that fails says so once per process, not at every read and write."""
    if place not in _warned:
        _warned.add(place)
        logger.warning(message, *args)


def configure_compile_cache(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """Points inductor's and Triton's on-disk caches at `cache_dir` and switches every cache on.

    Caches (all keyed by graph, torch version and device, so sharing a directory is safe): FX graph
    cache (compiled graphs), AOTAutograd cache (the traced joint graph), local autotune cache, Triton
    kernel binaries. A second process with the same directory skips most of inductor's and Triton's
    work and pays mostly for dynamo tracing. Call before anything is compiled. A directory that
    cannot be written leaves torch's own default (a temporary directory), with one warning.
    """
    import torch

    path = None
    if cache_dir is not None:
        place = str(Path(cache_dir).expanduser())
        path = Path(place).resolve()
        try:
            for sub in ("inductor", "triton"):
                (path / sub).mkdir(parents=True, exist_ok=True)
                probe = path / sub / f".probe-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            _warn_once(place, "compile cache directory %s cannot be written (%s): compiling with "
                       "torch's own temporary cache, nothing persists for the next start", path, exc)
            path = None
    if path is not None:
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


def rebuild_files() -> None:
    """From now on this process loads no file and writes new ones after its warm-ups, holding exactly
    what they compiled (a cache build: `zimage-serve-cache build`). Inductor's and Triton's
    directories still serve what they hold; their hits go into the new files too."""
    global _rebuilding
    _rebuilding = True


def load_compile_artifacts(cache_dir: str | os.PathLike[str] | None, name: str = "dit") -> bool:
    """Loads the file of artifact `name` for this cache's key into torch's caches: the node's copy,
    else the shared store's (then kept on the node too). Whether one was loaded."""
    import torch

    if cache_dir is None or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    cache = as_cache(cache_dir)
    key = cache.key(name)
    state = _states[name] = ArtifactState(key.file_name, cache)
    stores = [] if _rebuilding else cache.stores()
    for store in stores:
        try:
            data = store.get(key.file_name)
        except StoreUnavailable as exc:
            _warn_once(_place(cache, store), "compile cache %s unavailable (%s): compiling", store.where, exc)
            state.problems.append(f"{store.where}: unavailable")
            continue
        if data is None:
            continue
        try:
            info = torch.compiler.load_cache_artifacts(unpack(key, data))
        except Exception as exc:  # CacheFileError, or torch's: a foreign or broken file never stops a start
            logger.warning("ignoring compiled artifacts %s/%s (%s): a valid copy replaces it (the shared "
                           "store's, or this start's after its warm-up)", store.where, key.file_name, exc)
            state.problems.append(f"{store.where}: {exc}")
            continue
        logger.info("loaded compiled artifacts %s/%s (%d bytes)", store.where, key.file_name, len(data))
        state.loaded_from, state.entries = store.where, _entries(info)
        if store is not stores[0]:
            _write(stores[0], key.file_name, data, state, _place(cache, stores[0]))  # for the node's next start
        break
    state.baseline = CompileCounts.read()
    return state.loaded_from is not None


def save_compile_artifacts(cache_dir: str | os.PathLike[str] | None, name: str = "dit") -> Path | None:
    """After a warm-up: writes artifact `name`'s file (the node's copy here, the shared store's in
    the background: `wait_for_uploads`) when this process compiled something the loaded file lacked,
    or none was loaded. torch serializes only what this process used, so a file is replaced only by
    one that holds every entry of the loaded one. With nothing new, a shared store that lacks the
    node's file gets it. Returns the node's file when written."""
    import torch

    if cache_dir is None or not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    cache = as_cache(cache_dir)
    key = cache.key(name)
    state = _states.setdefault(name, ArtifactState(key.file_name, cache))
    local, *shared = cache.stores()
    fresh = state.loaded_from is None and not state.written_to  # nothing loaded, nothing written yet
    if not ((CompileCounts.read() - state.baseline).compiled_anything or fresh):
        for store in shared:
            if store.where != state.loaded_from and store.where not in state.written_to:
                _in_background(_share_node_copy, local, store, key.file_name, state, _place(cache, store))
        return None
    try:
        result = torch.compiler.save_cache_artifacts()
    except Exception as exc:
        logger.warning("could not serialize compiled artifacts %s: %s", name, exc)
        return None
    if not result:
        return None
    entries = _entries(result[1])
    replaces = state.loaded_from is not None or bool(state.written_to)  # a file this process knows of
    if replaces and (entries is None or state.entries is None or state.entries - entries):
        logger.info("kept compiled artifacts %s: this process has not yet used every entry the file holds",
                    key.file_name)
        return None
    data = pack(key, one_list_per_kind(result[0]))
    state.baseline, state.entries = CompileCounts.read(), entries
    written = local.directory / key.file_name if _write(local, key.file_name, data, state, _place(cache, local)) \
        else None
    for store in shared:
        _in_background(_write, store, key.file_name, data, state, _place(cache, store))
    return written


def save_every_artifact() -> None:
    """`save_compile_artifacts` for each artifact this process loaded or saved (a cache build, once
    every warm-up has run)."""
    for name, state in list(_states.items()):
        save_compile_artifacts(state.cache, name)


def one_list_per_kind(payload: bytes) -> bytes:
    """torch's artifact bytes with each kind's artifacts in one list. A process's second
    `save_cache_artifacts()` appends its new artifacts as a second list of the same kind (inductor,
    aot_autograd, ...) after the first save's, and `load_cache_artifacts` keeps only the last list of
    each kind: a file written after the warm-ups after ready held none of the graphs compiled before
    ready, and every new node compiled those again (the Denoiser on an H100, RESULTS.md 2026-12-07).
    Merged here through torch's own (private) serializer; where that is not there, the bytes as they
    are (a start then compiles what the file lacks, as before)."""
    try:
        from torch.compiler._cache import _deserialize_single_cache, _serialize_single_cache
        from torch.utils._appending_byte_serializer import AppendingByteSerializer

        merged: dict[str, list] = {}
        for kind, artifacts in AppendingByteSerializer.to_list(payload, deserialize_fn=_deserialize_single_cache):
            seen = {artifact.key for artifact in merged.setdefault(kind, [])}
            merged[kind].extend(artifact for artifact in artifacts if artifact.key not in seen)
        writer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
        writer.extend(merged.items())
        return writer.to_bytes()
    except Exception as exc:  # ImportError, or another layout: keep what torch wrote
        _warn_once("artifact-merge", "compiled artifacts kept as torch wrote them (%s): a file written twice "
                   "by one process may lack the first write's graphs", exc)
        return payload


def _entries(info) -> set[tuple[str, str]] | None:
    """The (kind, key) of each entry a CacheInfo lists; None where torch's CacheInfo does not say."""
    artifacts = getattr(info, "artifacts", None)
    if artifacts is None:
        return None
    return {(kind, key) for kind, keys in artifacts.items() for key in keys}


def _in_background(fn, *args) -> None:
    with _lock:
        _pending.append(_uploads.submit(fn, *args))


def _place(cache: CompileCache, store: ArtifactStore) -> str:
    """What a warning is about: the node's cache directory (its own copy lives inside), or the store."""
    inside = isinstance(store, DirectoryStore) and store.directory.parent == cache.directory
    return str(cache.directory) if inside else store.where


def _share_node_copy(local: ArtifactStore, store: ArtifactStore, file: str, state: ArtifactState, place: str) -> None:
    """The node's file to a shared store that lacks it (the node had it before the store was set)."""
    try:
        if file in store.names():
            return
        data = local.get(file)
    except StoreUnavailable as exc:
        _warn_once(place, "compile cache %s unavailable (%s): not shared", store.where, exc)
        return
    if data is not None:
        _write(store, file, data, state, place)


def _write(store: ArtifactStore, file: str, data: bytes, state: ArtifactState, place: str) -> bool:
    try:
        store.put(file, data)
    except StoreUnavailable as exc:
        _warn_once(place, "compiled artifacts not written to %s (%s)", store.where, exc)
        state.problems.append(f"{store.where}: not written")
        return False
    state.written_to.append(store.where)
    logger.info("wrote compiled artifacts %s/%s (%d bytes)", store.where, file, len(data))
    return True


def wait_for_uploads(timeout_s: float | None = None) -> bool:
    """Waits for the shared store's writes started so far; whether they all finished."""
    with _lock:
        pending = list(_pending)
    for future in pending:
        try:
            future.result(timeout=timeout_s)
        except Exception:  # a write's failure was logged by `_write`; a timeout is reported here
            return False
    return True


def compile_cache_status() -> dict[str, dict]:
    """Each artifact of this process: its file, where it was loaded from, problems, where written."""
    return {name: state.as_dict() for name, state in _states.items()}


def raise_recompile_limit(limit: int = 64) -> None:
    import torch

    config = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attr) and getattr(config, attr) < limit:
            setattr(config, attr, limit)
