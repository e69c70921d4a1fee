"""`response_format: "url"` over real HTTP with the official client: the local store served by the
Ingress, and an S3 bucket on a real S3-compatible server process (moto's, on 127.0.0.1); unknown and
expired names, keys, and stores that fail."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.image_store import FILES_ROUTE
from serve_app.protocol import ImageRequest
from tests.integration.conftest import APP_NAME, S3_BUCKET as BUCKET, S3_PREFIX as PREFIX, decode_png, off_loop
from tests.s3_server import TEST_CREDENTIALS

pytestmark = pytest.mark.integration

FAST = {"num_inference_steps": 2}


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture()
def store_dir(served) -> Path:
    """The local store's directory on this (one-node) cluster: the default, under ZIMAGE_CACHE_DIR."""
    return Path(os.environ["ZIMAGE_CACHE_DIR"]) / "images"


def download(url: str) -> tuple[httpx.Response, Image.Image]:
    response = httpx.get(url, timeout=30)  # no Authorization header: the URL is the capability
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return response, image


def png_upload(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def assert_not_found(response: httpx.Response, code: str | None = "image_not_found") -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "not_found_error" and error["message"]


# ---- the local store (the shared app's default) ------------------------------------------------


def test_generations_by_url_are_the_images_b64_json_gives(served, client, store_dir):
    result = client.images.generate(prompt="a lighthouse", n=2, size="512x640", response_format="url",
                                    extra_body={"seed": 11, **FAST})
    inline = client.images.generate(prompt="a lighthouse", n=2, size="512x640", extra_body={"seed": 11, **FAST})
    for by_url, by_value in zip(result.data, inline.data, strict=True):
        assert by_url.b64_json is None and by_url.url.startswith(f"{served.url}{FILES_ROUTE}")
        response, image = download(by_url.url)
        assert image.size == (512, 640) and response.headers["content-type"] == "image/png"
        assert 3500 <= int(response.headers["cache-control"].rsplit("=", 1)[1]) <= 3600
        assert np.array_equal(np.asarray(image), np.asarray(decode_png(by_value.b64_json)))
        assert (store_dir / urlsplit(by_url.url).path.rsplit("/", 1)[1]).is_file()
    assert [d.model_extra["seed"] for d in result.data] == [11, 12]


def test_edits_and_the_handle_api_by_url(served, client):
    edited = client.images.edit(image=("in.png", png_upload(640, 512), "image/png"), prompt="at night",
                                response_format="url", extra_body={"strength": 0.8, **FAST})
    assert download(edited.data[0].url)[1].size == (640, 512)

    from ray import serve

    request = ImageRequest(prompt="a koi pond", width=512, height=512, steps=2, seed=4, response_format="url")
    result = off_loop(lambda: serve.get_app_handle(APP_NAME).generate.remote(request).result(timeout_s=120))
    image = result.images[0]
    assert image.data == b"" and image.url.startswith(FILES_ROUTE)  # no request, no host: relative
    assert download(served.url + image.url)[1].size == (512, 512)


def test_a_stream_by_url_sends_partials_inline_and_the_image_as_a_url(served, client):
    events = list(client.images.generate(prompt="a fox", size="512x512", stream=True, partial_images=1,
                                         response_format="url", extra_body={"seed": 2, **FAST}))
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(partials) == 1 and partials[0].b64_json
    completed = events[-1]
    assert completed.type == "image_generation.completed"
    assert getattr(completed, "b64_json", None) is None
    assert download(completed.model_extra["url"])[1].size == (512, 512)


def test_unknown_malformed_and_expired_names_are_404s(served, http, store_dir):
    token = "A" * 43
    expired = store_dir / f"0000000001-{token}.png"  # a real file whose name says it expired
    expired.write_bytes(b"\x89PNG\r\n\x1a\nold")
    outside = store_dir.parent / f"9999999999-{token}.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\noutside")
    try:
        for name in (f"9999999999-{token}.png", expired.name, f"9999999999-{token}.png%00", ".tmp-x", "x" * 300,
                     "%2e%2e", "~"):
            assert_not_found(http.get(FILES_ROUTE + name))
        for name in ("..%2F" + outside.name, "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", ".."):
            assert_not_found(http.get(FILES_ROUTE + name), code=None)  # a slash: no such route at all
        assert http.get(FILES_ROUTE + "../" + outside.name).status_code == 404  # normalised by the client
    finally:
        expired.unlink(missing_ok=True)
        outside.unlink()


def test_image_urls_need_no_key_when_keys_are_on(served, client):
    url = client.images.generate(prompt="a cat", size="512x512", response_format="url", extra_body=FAST).data[0].url
    digest = hashlib.sha256(b"sk-url-test").hexdigest()
    try:
        served.deploy([{"name": "Ingress", "user_config": {"api": {"api_key_sha256": [digest]}}}])
        deadline = time.monotonic() + 30
        while httpx.get(f"{served.url}/v1/models", timeout=10).status_code != 401:
            assert time.monotonic() < deadline, "keys never came on"
            time.sleep(0.2)
        assert download(url)[1].size == (512, 512)
        assert httpx.get(f"{served.url}{FILES_ROUTE}9999999999-{'B' * 43}.png", timeout=10).status_code == 404
    finally:
        served.deploy()


def test_a_failing_local_store_is_a_503_and_returns_nothing(served, http, store_dir):
    body = {"prompt": "a cat", "size": "512x512", "response_format": "url", **FAST}
    saved = store_dir.with_name("images-saved")
    shutil.move(store_dir, saved)
    store_dir.write_bytes(b"not a directory")  # every write into it now fails
    try:
        response = http.post("/v1/images/generations", json=body)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("image_store_unavailable", "response_format")
        assert str(store_dir) not in error["message"]  # the path goes to the log, not the client
        assert http.post("/v1/images/generations", json={**body, "response_format": "b64_json"}).status_code == 200
        with http.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as stream:
            text = stream.read().decode()
        assert '"code":"image_store_unavailable"' in text and '"url"' not in text
    finally:
        store_dir.unlink()
        shutil.move(saved, store_dir)


# ---- an S3 bucket (moto's server), the app redeployed with it ----------------------------------


@pytest.fixture(scope="module")
def s3_app(served, last_args):
    """The shared app with `image_store.kind: s3` (and the ControlNet of test_controlnet.py's last test, on
    the same args: conftest's `last_args`); the bucket's credentials reach the Ingress replica through its
    environment only (runtime_env), never through args. Its tests run last of all (conftest's OTHER_ARGS)."""
    args, deployments, server = last_args
    return served.use(args, deployments), server


@pytest.mark.parametrize("route", ["generate", "edit"])
def test_s3_store_urls_are_presigned_and_serve_the_png(s3_app, route):
    app, server = s3_app
    with openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", timeout=120, max_retries=0) as client:
        if route == "generate":
            result = client.images.generate(prompt="a koi pond", size="640x512", response_format="url",
                                            extra_body=FAST)
            size = (640, 512)
        else:
            result = client.images.edit(image=("in.png", png_upload(512, 512), "image/png"), prompt="at dusk",
                                        response_format="url", extra_body=FAST)
            size = (512, 512)
    url = urlsplit(result.data[0].url)
    assert f"{url.scheme}://{url.netloc}" == server.endpoint_url
    assert url.path.startswith(f"/{BUCKET}/{PREFIX}/") and "X-Amz-Signature=" in url.query
    assert "X-Amz-Expires=600" in url.query and TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in url.query
    assert download(result.data[0].url)[1].size == size


def test_an_unreachable_bucket_is_a_prompt_503(s3_app):
    app, server = s3_app
    server.stop()  # the last test of this app: the server is gone for good
    body = {"prompt": "a cat", "size": "512x512", "response_format": "url", **FAST}
    start = time.monotonic()
    response = httpx.post(f"{app.url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "image_store_unavailable"
    assert "data" not in response.json()
    assert time.monotonic() - start < 60
    inline = httpx.post(f"{app.url}/v1/images/generations", json={**body, "response_format": "b64_json"}, timeout=120)
    assert inline.status_code == 200


def test_an_ingress_scaled_out_by_the_config_file_refuses_a_local_store(served, http):
    """A config file's `deployments` entry applies after the builder, so the replica itself refuses:
    Serve reports the message on the deployment, and the running replica keeps serving."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {"http_options": {"host": "127.0.0.1", "port": served.port}, "applications": [{
        "name": APP_NAME, "route_prefix": "/", "import_path": "serve_app:build_app", "args": served.args,
        "deployments": [{"name": "Ingress", "num_replicas": 2}]}]}
    try:
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        deadline = time.monotonic() + 240
        message = ""
        while "would not be found on another" not in message:
            assert time.monotonic() < deadline, f"no refusal reported; Ingress status: {message!r}"
            time.sleep(1)
            ingress = serve.status().applications[APP_NAME].deployments.get("Ingress")
            message = ingress.message if ingress is not None else ""
        assert "shared_directory" in message and "'s3'" in message
        assert http.get("/health/live").status_code == 200  # the replica already running still serves
    finally:
        served.deploy()
