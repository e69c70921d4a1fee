"""The compile cache: keyed files that a start loads and writes after its warm-up, shared through a
directory or moto's real S3 server; a foreign, corrupt, unwritable or unreachable cache never fails
a start. The starts compile a tiny module with inductor, each in a process of its own
(tests/compile_cache_worker.py), as replicas are."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from deployments.runtime.artifact_store import DirectoryStore, S3Store, SharedCompileCache
from deployments.runtime.cache_key import CacheFileError, CacheKey, pack, unpack
from deployments.runtime.compile_cache import CompileCache, load_compile_artifacts
from tests.s3_server import TEST_CREDENTIALS, credentials_in_environment, free_port, s3_server

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "zimage-compile-unit"


def start(directory: Path, shared: dict | None = None, functions: tuple[str, ...] = ("square",),
          later: tuple[str, ...] = ()) -> dict:
    """One replica start (tests/compile_cache_worker.py) against `directory` and the `shared` store,
    compiling `functions` as its warm-up before ready and `later` after it, the file written after each."""
    spec = {"directory": str(directory), "shared": shared, "identity": {"model": "tiny-test"},
            "functions": list(functions), "later": list(later)}
    done = subprocess.run([sys.executable, "-m", "tests.compile_cache_worker", json.dumps(spec)], cwd=ROOT,
                          env={**os.environ, **TEST_CREDENTIALS}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server, credentials_in_environment():
        server.create_bucket(BUCKET)
        yield {"s3": {"bucket": BUCKET, "prefix": "compile", "endpoint_url": server.endpoint_url, "timeout_s": 30}}


def test_a_new_node_starts_from_the_shared_bucket_and_compiles_nothing(tmp_path, s3):
    """Three starts on three nodes: cold (compiles, writes the node and the bucket), a node with a corrupt
    copy (hits only, from the bucket), a node that compiles something new but never uses an entry."""
    first = start(tmp_path / "node-a", s3, ("square", "gram"))
    assert not first["loaded"] and first["counts"]["fx_misses"] >= 2  # compiled, cold
    assert first["status"]["written_to"] == [str(tmp_path / "node-a" / "mega"), "s3://zimage-compile-unit/compile"]
    assert first["uploads_ok"] and first["warnings"] == []

    # Another node, whose own copy is corrupt (cut short): ignored with a warning, the bucket's loaded and
    # kept in its place.
    whole = (tmp_path / "node-a" / "mega" / first["file"]).read_bytes()
    corrupt = tmp_path / "node-b" / "mega" / first["file"]
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(whole[: len(whole) // 2])
    second = start(tmp_path / "node-b", s3)
    assert second["loaded"] and second["status"]["loaded_from"] == "s3://zimage-compile-unit/compile"
    counts = second["counts"]
    assert counts["fx_hits"] >= 1 and counts["fx_misses"] == 0 and counts["aot_misses"] == 0, counts
    assert counts["frames"] >= 1 and counts["dynamo_s"] > 0  # dynamo still traced, and was timed apart
    assert second["status"]["written_to"] == [str(tmp_path / "node-b" / "mega")]  # the node's copy; S3 had it
    assert len(second["warnings"]) == 1 and "corrupt payload" in second["warnings"][0], second["warnings"]
    assert corrupt.read_bytes() == whole

    # A start that compiled something new but never used one of the file's entries keeps the file:
    # torch would serialize only what this process used, and the next start would lose `gram`.
    third = start(tmp_path / "node-c", s3, ("square", "cube"))
    assert third["loaded"] and third["counts"]["fx_misses"] >= 1 and third["written"] is None
    assert third["status"]["written_to"] == [str(tmp_path / "node-c" / "mega")]  # only the copy of the loaded file


def test_a_corrupt_file_with_no_valid_copy_anywhere_is_rewritten_after_the_warm_up(tmp_path):
    """No bucket, and the node's only copy is corrupt (cut short): one warning at load, the start
    compiles, and the save after its warm-up writes a whole file for the key in its place (the check the
    load failed; that such a file serves a new node: the tests around this one)."""
    key = CompileCache(tmp_path, {"model": "tiny-test"}).key("tiny")  # the worker's key
    corrupt = tmp_path / "node-a" / "mega" / key.file_name
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(pack(key, bytes(4096))[:-1024])
    result = start(tmp_path / "node-a")
    assert result["file"] == key.file_name and not result["loaded"]
    assert result["counts"]["fx_misses"] >= 1, result["counts"]  # compiled
    assert len(result["warnings"]) == 1 and "corrupt payload" in result["warnings"][0], result["warnings"]
    assert result["written"] == str(corrupt) and result["status"]["written_to"] == [str(corrupt.parent)]
    unpack(key, corrupt.read_bytes())  # CacheFileError unless whole and for this key, as at load


def test_a_file_written_before_and_after_ready_holds_both_warm_ups(tmp_path):
    """A replica writes its file at ready and again after its warm-ups after ready. torch appends the
    second write's graphs as lists of their own, of which its loader keeps only the last per kind; the
    file we write holds both, so a new node compiles neither (the Denoiser did, on an H100)."""
    shared = {"directory": str(tmp_path / "shared")}
    build = start(tmp_path / "build-node", shared, ("square",), later=("gram",))
    assert build["counts"]["fx_misses"] >= 2 and build["written"]
    new_node = start(tmp_path / "new-node", shared, ("square",), later=("gram",))
    counts = new_node["counts"]
    assert new_node["loaded"] and counts["fx_hits"] >= 2, counts
    assert counts["fx_misses"] == 0 and counts["aot_misses"] == 0, counts


def test_an_unwritable_directory_and_an_unreachable_bucket_each_warn_once_and_the_start_compiles(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the cache directory should be")
    unreachable = {"s3": {"bucket": BUCKET, "endpoint_url": f"http://127.0.0.1:{free_port()}", "timeout_s": 5}}
    result = start(blocker / "cache", unreachable)
    assert not result["configured"] and not result["loaded"] and result["written"] is None
    assert result["counts"]["frames"] >= 1  # the module compiled and ran (torch's own temporary cache)
    warnings = result["warnings"]
    assert len(warnings) == 2, warnings  # one for the directory, one for the bucket: not one per read or write
    assert "cannot be written" in warnings[0] and "unavailable" in warnings[1]
    assert result["status"]["problems"] == [f"s3://{BUCKET}/zimage-compile: unavailable",
                                            f"{blocker / 'cache' / 'mega'}: not written",
                                            f"s3://{BUCKET}/zimage-compile: not written"]


def test_a_file_for_another_key_is_never_loaded(tmp_path, caplog):
    cache = CompileCache(tmp_path, {"model": "tiny-test", "precision": "fp8"})
    key = cache.key("dit")
    doctored = CacheKey(key.artifact, key.identity, {**key.libraries, "torch": "2.99.0"}, key.device, key.python)
    (tmp_path / "mega").mkdir()
    (tmp_path / "mega" / key.file_name).write_bytes(pack(doctored, b"artifacts for another torch"))
    with caplog.at_level(logging.WARNING):
        assert load_compile_artifacts(cache, "dit") is False
    assert "written for another key (differs in libraries)" in caplog.text
    with pytest.raises(CacheFileError, match="differs in device"):
        unpack(key, pack(CacheKey(key.artifact, key.identity, key.libraries, "NVIDIA A100 sm80"), b"x"))


def test_every_part_of_the_key_names_another_file():
    key = CacheKey("dit-fp8", {"model": "random", "precision": "fp8", "fp8_kernels": "fused"},
                   {"torch": "2.11.0", "diffusers": "0.42.1", "transformers": "5.17.0", "triton": "3.5.0"},
                   "NVIDIA H200 sm90 cuda13.0", "3.11")
    variants = [
        CacheKey("vae", key.identity, key.libraries, key.device, key.python),
        CacheKey(key.artifact, {**key.identity, "model": "Tongyi-MAI/Z-Image-Turbo"}, key.libraries, key.device),
        CacheKey(key.artifact, {**key.identity, "precision": "bf16"}, key.libraries, key.device, key.python),
        CacheKey(key.artifact, {**key.identity, "fp8_kernels": "inductor"}, key.libraries, key.device, key.python),
        *(CacheKey(key.artifact, key.identity, {**key.libraries, name: "0"}, key.device, key.python)
          for name in key.libraries),
        CacheKey(key.artifact, key.identity, key.libraries, "NVIDIA H100 80GB HBM3 sm90 cuda13.0", key.python),
        CacheKey(key.artifact, key.identity, key.libraries, key.device, "3.12"),
    ]
    names = {key.file_name} | {variant.file_name for variant in variants}
    assert len(names) == len(variants) + 1
    assert all(name.endswith(".bin") for name in names) and key.file_name.startswith("dit-fp8-")


def test_two_writers_leave_a_whole_file_that_readers_never_see_half_written(tmp_path):
    store = DirectoryStore(tmp_path / "shared")
    key = CacheKey("dit", {"model": "tiny-test"})
    files = [pack(key, bytes([n]) * (4 << 20)) for n in range(2)]
    seen, stop = [], threading.Event()

    def write(data: bytes) -> None:
        for _ in range(20):
            store.put(key.file_name, data)

    def read() -> None:
        while not stop.is_set():
            data = store.get(key.file_name)
            if data is not None:
                seen.append(unpack(key, data)[:1])  # raises on a torn file

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(data,)) for data in files]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reader.join()
    assert unpack(key, store.get(key.file_name))[:1] in (b"\x00", b"\x01") and seen
    assert sorted(p.name for p in store.directory.iterdir()) == [key.file_name]  # no temporary file left


def test_the_bucket_store_round_trips_and_lists(s3):
    store = S3Store(SharedCompileCache.model_validate(s3).s3.model_copy(update={"prefix": "round-trip"}))
    assert store.get("absent.bin") is None
    store.put("dit-0123.bin", b"abc")
    assert store.get("dit-0123.bin") == b"abc" and store.names() == {"dit-0123.bin": 3}


def test_the_settings_take_one_place_and_refuse_credentials():
    with pytest.raises(ValueError, match="one of"):
        SharedCompileCache.model_validate({})
    with pytest.raises(ValueError, match="one of"):
        SharedCompileCache.model_validate({"directory": "/mnt/x", "s3": {"bucket": "abc"}})
    with pytest.raises(ValueError, match="Extra inputs"):
        SharedCompileCache.model_validate({"s3": {"bucket": "abc", "aws_secret_access_key": "x"}})

