"""The OpenAI-compatible API, driven by the official `openai` client and raw HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.integration.conftest import decode_png

pytestmark = pytest.mark.integration

FAST = {"num_inference_steps": 2}


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def png_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_openai_client_generates_with_extensions(client):
    result = client.images.generate(
        prompt="a robot reading a book in a library",
        n=2,
        size="512x512",
        response_format="b64_json",
        extra_body={"seed": 21, "style": "Anime", "negative_prompt": "blurry", "guidance_scale": 1.5, **FAST},
    )
    assert [item.model_extra["seed"] for item in result.data] == [21, 22]
    for item in result.data:
        assert decode_png(item.b64_json).size == (512, 512)
        assert "animation" in item.revised_prompt


def test_same_seed_same_image_and_default_size(client):
    first = client.images.generate(prompt="a koi pond", extra_body={"seed": 5, **FAST}, size="512x640")
    again = client.images.generate(prompt="a koi pond", extra_body={"seed": 5, **FAST}, size="512x640")
    assert first.data[0].b64_json == again.data[0].b64_json
    assert decode_png(first.data[0].b64_json).size == (512, 640)


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_output_formats(client, fmt, magic):
    result = client.images.generate(
        prompt="a desert canyon", size="512x512", output_format=fmt, output_compression=30, extra_body=FAST
    )
    assert base64.b64decode(result.data[0].b64_json).startswith(magic)


def test_random_seed_is_returned_when_absent(client):
    result = client.images.generate(prompt="a cat", size="512x512", extra_body=FAST)
    assert isinstance(result.data[0].model_extra["seed"], int)


def test_openai_client_edits_an_uploaded_image(client):
    upload = png_bytes(600, 400, seed=1)
    result = client.images.edit(
        image=("photo.png", upload, "image/png"),
        prompt="turn it into a watercolor",
        n=1,
        extra_body={"strength": 0.5, "seed": 3, **FAST},
    )
    image = decode_png(result.data[0].b64_json)
    assert image.size == (768, 512)  # the upload's 3:2 ratio, short side raised to 512
    sized = client.images.edit(
        image=("photo.jpg", png_bytes(512, 512, seed=2, fmt="JPEG"), "image/jpeg"),
        prompt="same",
        size="512x768",
        extra_body={"seed": 3, **FAST},
    )
    assert decode_png(sized.data[0].b64_json).size == (512, 768)


def test_models_styles_and_health(http):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "z-image-turbo" and models["data"][0]["random_weights"] is True
    styles = http.get("/v1/styles").json()
    assert len(styles["data"]) == 10 and styles["default"] == "None"
    assert all("{prompt}" in s["template"] for s in styles["data"])
    assert http.get("/health/live").status_code == 200
    ready = http.get("/health/ready")
    assert ready.status_code == 200 and all(ready.json()["stages"].values())


GEN = "/v1/images/generations"
BAD_GENERATIONS = [
    ({"prompt": ""}, 400, "prompt", "prompt"),
    ({"prompt": "   "}, 400, "prompt", "text"),
    ({}, 400, "prompt", "Missing required parameter"),
    ({"prompt": "x", "n": 0}, 400, "n", "n"),
    ({"prompt": "x", "n": 5}, 400, "n", "at most 4"),
    ({"prompt": "x", "size": "1000x1024"}, 400, "size", "multiple of 16"),
    ({"prompt": "x", "size": "100x100"}, 400, "size", "each side a multiple of 16 within 512..2048"),
    ({"prompt": "x", "size": "256x256"}, 400, "size", "outside 512..2048"),
    ({"prompt": "x", "size": "big"}, 400, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size", "outside"),
    ({"prompt": "x", "response_format": "gif"}, 400, "response_format", "response_format"),
    ({"prompt": "x", "output_format": "bmp"}, 400, "output_format", "output_format"),
    ({"prompt": "x", "output_compression": 101}, 400, "output_compression", "output_compression"),
    ({"prompt": "x", "num_inference_steps": 17}, 400, "num_inference_steps", "1..16"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "num_inference_steps"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed"),
    ({"prompt": "x", "seed": "abc"}, 400, "seed", "seed"),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale", "guidance_scale"),
    ({"prompt": "x", "style": "Baroque"}, 400, "style", "known styles"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model", "does not exist"),
    ({"prompt": "x", "colour": "red"}, 400, "colour", "Unrecognized request argument"),
    ({"prompt": "x", "stream": "sometimes"}, 400, "stream", "stream"),
    ({"prompt": "x", "partial_images": 4}, 400, "partial_images", "partial_images"),
    ({"prompt": "x", "background": "transparent"}, 400, "background", "background"),
    ({"prompt": 42}, 400, "prompt", "prompt"),
]


@pytest.mark.parametrize("body,status,param,message", BAD_GENERATIONS, ids=lambda v: str(v)[:40])
def test_bad_generation_inputs(http, body, status, param, message):
    response = http.post(GEN, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message.lower() in error["message"].lower()
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    "content,headers,status,fragment",
    [
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, 400, "JSON object"),
        (b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
        (b"{\"prompt\": \"" + b"x" * (70 << 10) + b"\"}", {"content-type": "application/json"}, 413, "limit"),
        (b'{"prompt": "x", "seed": ' + b"7" * 5000 + b"}", {"content-type": "application/json"}, 400, "digits"),
        (b'{"prompt": "x", "n": ' + b"[" * 20000 + b"]" * 20000 + b"}", {"content-type": "application/json"}, 400,
         "nests too deeply"),
    ],
    ids=["not-json", "array", "form", "too-large", "huge-int", "deep-nesting"],
)
def test_malformed_bodies(http, content, headers, status, fragment):
    response = http.post(GEN, content=content, headers=headers)
    assert response.status_code == status
    assert fragment.lower() in response.json()["error"]["message"].lower()


def test_unknown_route_and_wrong_method_use_the_error_shape(http):
    missing = http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = http.get(GEN)
    assert wrong.status_code == 405 and "not allowed" in wrong.json()["error"]["message"]


def truncated_png() -> bytes:
    return png_bytes(512, 512)[:2000]


def bomb_png() -> bytes:
    """A tiny file that claims a huge canvas: refused from its header, before decoding."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")
    return buffer.getvalue()


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (600, 600)).save(buffer, format="GIF")
    return buffer.getvalue()


EDIT = "/v1/images/edits"
BAD_EDITS = [
    ({"prompt": "x"}, None, 400, "image", "Missing required parameter"),
    ({"prompt": "x"}, ("a.png", truncated_png(), "image/png"), 400, "image", "truncated or corrupt"),
    ({"prompt": "x"}, ("a.txt", b"hello world, not an image", "text/plain"), 400, "image", "decoded"),
    ({"prompt": "x"}, ("a.gif", gif_bytes(), "image/gif"), 400, "image", "Unsupported image format GIF"),
    ({"prompt": "x"}, ("a.png", bomb_png(), "image/png"), 400, "image", "limit of"),
    ({"prompt": "x"}, ("a.png", b"\x89PNG" + b"0" * (3 << 20), "image/png"), 413, "image", "limit"),
    # over the whole body's cap: the image, its mask and a control image at the upload cap each, and the fields
    ({"prompt": "x"}, ("a.png", b"\x89PNG" + b"0" * (7 << 20), "image/png"), 413, None, "limit"),
    ({"prompt": "x", "strength": "0.05"}, ("a.png", png_bytes(512, 512), "image/png"), 400, "strength", "strength"),
    ({"prompt": "x", "strength": "abc"}, ("a.png", png_bytes(512, 512), "image/png"), 400, "strength", "strength"),
    ({"prompt": "x", "n": "9"}, ("a.png", png_bytes(512, 512), "image/png"), 400, "n", "at most"),
    ({"prompt": "x", "size": "100x100"}, ("a.png", png_bytes(512, 512), "image/png"), 400, "size", "multiple"),
    ({"prompt": ""}, ("a.png", png_bytes(512, 512), "image/png"), 400, "prompt", "prompt"),
]


@pytest.mark.parametrize("data,upload,status,param,message", BAD_EDITS, ids=lambda v: str(v)[:30])
def test_bad_edit_inputs(http, data, upload, status, param, message):
    if upload is None:  # a multipart body with fields only
        headers = {"content-type": "multipart/form-data; boundary=b0"}
        response = http.post(EDIT, content=_multipart_without_image(data), headers=headers)
    else:
        response = http.post(EDIT, data=data, files={"image": upload})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message.lower() in error["message"].lower()


def _multipart_without_image(fields: dict) -> bytes:
    parts = [f'--b0\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return ("".join(parts) + "--b0--\r\n").encode()


def test_edit_needs_multipart(http):
    response = http.post(EDIT, json={"prompt": "x"})
    assert response.status_code == 415


def test_api_keys_guard_every_route_but_health(served, http):
    key = "sk-test-123"
    api = dict(served.args["api"], api_key_sha256=[hashlib.sha256(key.encode()).hexdigest()])
    try:
        served.deploy([{"name": "Ingress", "user_config": {"api": api}}])
        _wait_for_auth(http)
        assert http.get("/health/live").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/styles"), ("POST", GEN)):
            response = http.request(method, path, json={"prompt": "x"} if method == "POST" else None)
            assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=120) as good:
            assert good.images.generate(prompt="a cat", size="512x512", extra_body=FAST).data
        with openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.images.generate(prompt="a cat", size="512x512")
    finally:
        served.deploy()
        _wait_for_auth(http, enabled=False)


def _wait_for_auth(http, enabled: bool = True, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (http.get("/v1/models").status_code == 401) == enabled:
            return
        time.sleep(0.2)
    raise TimeoutError("the Ingress did not pick up its new API keys")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
FIELDS = ["prompt", "n", "size", "seed", "num_inference_steps", "guidance_scale", "style", "response_format",
          "output_format", "output_compression", "model", "negative_prompt", "user", "quality", "extra"]


FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def cheap(body: dict) -> dict:
    """A body that passes validation runs the model: at 512x512, one step and one image, it is cheap."""
    body.setdefault("num_inference_steps", 1)
    if isinstance(body.get("size"), str) or "size" not in body:
        body.setdefault("size", "512x512")
    if isinstance(body.get("n"), int) and body["n"] > 1:
        body["n"] = 1  # larger n is covered above
    return body


def assert_not_a_server_error(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "request_id"} and error["message"]
    else:
        assert response.json()["data"]


@settings(FUZZ, max_examples=500)
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5))
def test_fuzzed_generation_bodies_never_cause_a_5xx(http, body):
    """Whatever the body, the answer is a 2xx image or a 4xx in the error shape, never a 5xx."""
    assert_not_a_server_error(http.post(GEN, json=cheap(body)))


FORM_VALUES = st.text(max_size=12) | st.integers(-(2**70), 2**70).map(str) | st.sampled_from(
    ["9" * 5000, "1e400", "NaN", "-0", "0.5", "512x512", "auto", "png", "b64_json", "1" * 30]
)
EDIT_FIELDS = ["prompt", "n", "size", "seed", "num_inference_steps", "strength", "guidance_scale", "style",
               "output_format", "response_format", "model", "extra"]
UPLOADS = st.sampled_from([png_bytes(64, 48, seed=5), png_bytes(512, 512, seed=6)[:300], b"", b"\x89PNG junk"])


@settings(FUZZ, max_examples=100)
@given(fields=st.dictionaries(st.sampled_from(EDIT_FIELDS), FORM_VALUES, max_size=5), upload=UPLOADS)
def test_fuzzed_edit_uploads_never_cause_a_5xx(http, fields, upload):
    response = http.post(EDIT, data=cheap(fields) | {"num_inference_steps": "1"}, files={"image": ("i.png", upload)})
    assert_not_a_server_error(response)


@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),
        (b'{"prompt": "x", "guidance_scale": Infinity}', "guidance_scale"),
        (b'{"prompt": "x", "seed": -Infinity}', "seed"),
        (b'{"prompt": "x", "n": 1e400}', "n"),
    ],
)
def test_non_finite_numbers_are_rejected(http, raw, param):
    """Python's JSON parser accepts NaN and Infinity; the API does not."""
    response = http.post(GEN, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
