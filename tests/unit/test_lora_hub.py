"""Hub aliases: the operator's `lora_hub` specs, resolution by huggingface_hub itself (offline from a
pre-populated hub cache, and against a hub endpoint on 127.0.0.1 that serves files and the hub's error
headers), and what each failure becomes for the client."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from pydantic import ValidationError

from deployments.contracts import LoraRef
from deployments.denoiser.lora.cache import AdapterCache
from deployments.denoiser.lora.errors import (LoraFitError, LoraFormatError, LoraHubMissingError,
                                              LoraHubUnavailableError, UnknownLoraError)
from deployments.denoiser.lora.hub import HubFile
from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
from deployments.denoiser.lora.slots import install_lora
from deployments.settings import ModelSettings
from deployments.weights import loading
from serve_app.errors import api_error_for
from serve_app.loras import LoraCatalog
from deployments.denoiser.lora.random_adapters import diffusers_state, kohya_state, random_factors, write
from tests.lora_files import hub_cache

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _metrics_off(monkeypatch):
    monkeypatch.setenv("ZIMAGE_METRICS", "0")


@pytest.fixture()
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def transformer(tiny_source):
    return loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def states(transformer):
    return {"ink": kohya_state(random_factors(transformer, rank=8, seed=8), alpha=4.0),
            "wash": diffusers_state(random_factors(transformer, rank=4, seed=9))}


@pytest.fixture()
def hub(tmp_path, states):
    cache = tmp_path / "hub"
    hub_cache(cache, "studio/ink-lora", "ink.safetensors", states["ink"], commit=COMMIT)
    hub_cache(cache, "studio/wash", "pytorch_lora_weights.safetensors", states["wash"])
    return cache


def settings(tmp_path, cache, aliases, **extra) -> LoraSettings:
    return LoraSettings(lora_dir=str(tmp_path / "dir"), hub=aliases, hub_cache_dir=str(cache), **extra)


@pytest.mark.parametrize("spec, parsed", [
    ("studio/ink", HubFile("studio/ink")),
    ("studio/ink:ink.safetensors", HubFile("studio/ink", "ink.safetensors")),
    (f"studio/ink@{COMMIT}:sub/ink.safetensors", HubFile("studio/ink", "sub/ink.safetensors", COMMIT)),
    ("studio/ink@v1.0", HubFile("studio/ink", revision="v1.0")),
])
def test_hub_specs(spec, parsed):
    assert HubFile.parse(spec) == parsed


@pytest.mark.parametrize("aliases, message", [
    ({"ink": "studio/ink:ink.bin"}, "only .safetensors"),
    ({"ink": "studio/ink:ink.pt"}, "only .safetensors"),
    ({"ink": "studio/ink:../../etc/x.safetensors"}, "only .safetensors"),
    ({"ink": "/abs/path:ink.safetensors"}, "not a hub repository id"),
    ({"ink": "studio/ink@..:x.safetensors"}, "bad revision"),
    ({"../ink": "studio/ink"}, "must match"),
    ({"in.k": "studio/ink"}, "must match"),
])
def test_bad_aliases_fail_when_the_app_is_built(aliases, message):
    with pytest.raises(ValidationError, match=message):
        ModelSettings(lora_hub=aliases)


def test_an_alias_resolves_offline_from_the_hub_cache(tmp_path, hub, states, offline):
    write(tmp_path / "dir", "local", states["wash"])
    lib = LoraLibrary(settings(tmp_path, hub, {"ink": "studio/ink-lora:ink.safetensors",
                                               "pinned": f"studio/ink-lora@{COMMIT}:ink.safetensors",
                                               "wash": "studio/wash"}))
    assert lib.names() == ["ink", "local", "pinned", "wash"]
    info = lib.info("ink")
    assert (info.rank, info.source, info.fetched) == (8, "hub", True)
    assert info.bytes == (hub / "models--studio--ink-lora" / "snapshots" / COMMIT / "ink.safetensors").stat().st_size
    assert lib.info("wash").rank == 4 and lib.info("local").source == "directory"
    # the same factors as the same file read from the directory
    write(tmp_path / "dir", "inkcopy", states["ink"])
    ours, copy = lib.load("pinned")[0], lib.load("inkcopy")[0]
    assert ours.targets == copy.targets
    for module, (a, b) in copy.factors.items():
        torch.testing.assert_close(ours.factors[module][0], a, rtol=0, atol=0)
        torch.testing.assert_close(ours.factors[module][1], b, rtol=0, atol=0)


def test_the_denoiser_cache_fetches_and_the_ingress_never_downloads(tmp_path, hub, transformer, offline):
    aliases = {"ink": "studio/ink-lora:ink.safetensors", "gone": "studio/not-cached:x.safetensors"}
    catalog = LoraCatalog({**settings(tmp_path, hub, aliases).model_dump()})
    listed = {e["name"]: e for e in asyncio.run(catalog.listing())["data"]}
    assert listed["ink"]["rank"] == 8 and listed["ink"]["source"] == "hub"
    assert listed["gone"] == {"object": "lora", "name": "gone", "rank": 0, "target_modules": [], "bytes": 0,
                              "source": "hub", "fetched": False}
    catalog.check([LoraRef("gone")])  # the Ingress lets it through: the Denoiser fetches it
    cache = AdapterCache(LoraLibrary(settings(tmp_path, hub, aliases)), install_lora(transformer), 1 << 30)
    (adapter, scale), = cache.resolve([LoraRef("ink", 0.5)])
    assert adapter.name == "ink" and scale == 0.5 and cache.counts.loads == 1
    cache.resolve([LoraRef("ink")])
    assert cache.counts.hits == 1
    with pytest.raises(LoraHubUnavailableError) as info:  # offline and not cached
        cache.resolve([LoraRef("gone")])
    error = api_error_for(info.value)
    assert (error.status, error.param, error.code) == (503, "loras", "lora_unavailable") and "'gone'" in error.message
    with pytest.raises(UnknownLoraError):
        cache.resolve([LoraRef("studio/ink-lora")])  # a hub id is never a name


class FakeHub(BaseHTTPRequestHandler):
    """A hub endpoint: `/{owner}/{repo}/resolve/{revision}/{file}`, with the headers huggingface_hub reads."""

    files: dict[tuple[str, str], bytes] = {}

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        owner, repo, _, revision, filename = self.path.lstrip("/").split("?")[0].split("/", 4)
        repo_id = f"{owner}/{repo}"
        if repo == "down":
            return self._send(503, {})
        if repo == "gone":
            return self._send(401, {"X-Error-Code": "RepoNotFound"})
        if revision == "nope":
            return self._send(404, {"X-Error-Code": "RevisionNotFound"})
        data = self.files.get((repo_id, filename))
        if data is None:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        self._send(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                         "Content-Length": str(len(data))}, data if body else b"")

    def _send(self, status: int, headers: dict, data: bytes = b"") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint(tmp_path, states):
    path = tmp_path / "served.safetensors"
    write(tmp_path, "served", states["wash"])
    FakeHub.files = {("studio/wash", "pytorch_lora_weights.safetensors"): path.read_bytes()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_file_is_downloaded_on_first_use_into_the_hub_cache(tmp_path, endpoint):
    cache = tmp_path / "fresh"
    lib = LoraLibrary(settings(tmp_path, cache, {"wash": "studio/wash"}), hub_endpoint=endpoint)
    assert lib.info("wash").rank == 4
    assert (cache / "models--studio--wash" / "snapshots" / COMMIT / "pytorch_lora_weights.safetensors").is_file()
    ingress = LoraLibrary(settings(tmp_path, cache, {"wash": "studio/wash"}), fetch_hub=False)
    assert ingress.info("wash").fetched and ingress.info("wash").rank == 4  # now on this node


@pytest.mark.parametrize("spec, reason", [
    ("studio/wash:missing.safetensors", "EntryNotFoundError"),
    ("studio/gone", "RepositoryNotFoundError"),
    ("studio/wash@nope", "RevisionNotFoundError"),
])
def test_a_hub_file_that_cannot_exist_is_a_400_naming_the_alias(tmp_path, endpoint, spec, reason):
    lib = LoraLibrary(settings(tmp_path, tmp_path / "c", {"odd": spec}), hub_endpoint=endpoint)
    with pytest.raises(LoraHubMissingError) as info:
        lib.load("odd")
    assert reason in str(info.value)
    crossed = pickle.loads(pickle.dumps(info.value))  # as it leaves the Denoiser's process
    assert type(crossed) is LoraHubMissingError and str(crossed) == str(info.value)
    error = api_error_for(crossed)
    assert (error.status, error.param, error.code) == (400, "loras", "invalid_lora") and "'odd'" in error.message


@pytest.mark.parametrize("where", ["closed-port", "hub-503"])
def test_an_unreachable_hub_is_a_503(tmp_path, endpoint, where, monkeypatch):
    """After huggingface_hub's own retries (their backoff, 23 s in all, is skipped here)."""
    import socket

    from huggingface_hub.utils import _http

    waits = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    url, spec = (closed, "studio/wash") if where == "closed-port" else (endpoint, "studio/down")
    lib = LoraLibrary(settings(tmp_path, tmp_path / "c", {"later": spec}), hub_endpoint=url)
    with pytest.raises(LoraHubUnavailableError):
        lib.load("later")
    assert waits, "huggingface_hub retried"
    error = api_error_for(LoraHubUnavailableError("later"))
    assert (error.status, error.retry_after_s) == (503, lib.hub.retry_after_s)
    tries = len(waits)
    with pytest.raises(LoraHubUnavailableError):  # remembered: no second round of the hub's retries
        lib.load("later")
    assert len(waits) == tries
    if where == "closed-port":  # once the wait is over, a reachable hub serves the file
        lib.hub.retry_after_s, lib.hub.endpoint = 0.0, endpoint
        assert lib.load("later")[0].rank == 4


def test_caps_hold_for_hub_files(tmp_path, hub, offline):
    aliases = {"ink": "studio/ink-lora:ink.safetensors"}
    size = LoraLibrary(settings(tmp_path, hub, aliases)).info("ink").bytes
    capped = LoraLibrary(settings(tmp_path, hub, aliases, max_file_bytes=size - 1))
    assert "over the server's cap" in capped.info("ink").error
    with pytest.raises(LoraFormatError, match="cap"):
        capped.load("ink")
    with pytest.raises(LoraFitError, match="rank 8 is over"):
        LoraLibrary(settings(tmp_path, hub, aliases, max_rank=4)).load("ink")
