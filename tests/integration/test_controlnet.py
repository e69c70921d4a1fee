"""ControlNet through the served app: the official client's generations and inpainting edits with a
control image against diffusers' `ZImageControlNetPipeline` and `ZImageControlNetInpaintPipeline` on
the tiny checkpoint and the tiny ControlNet, canny preprocessing, bad control input over real HTTP
(1x1 and 20000x20000 control images among it), and the load generator's controlled requests.

The module's first test runs against the shared app as deployed (no ControlNet); the rest redeploy
it with `controlnet: tiny`, the last with the tiny Union 1.0 layout (no mask channels; conftest's
`last_args`, which test_image_urls.py's S3 tests share); they run after
the other integration tests (tests/integration/conftest.py: OTHER_ARGS), and the session's args come back
before a test that needs them. Each test names the ControlNet it needs; the app is redeployed only when
that changes.
"""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from serve_app.control import base64_cap, canny
from serve_app.protocol import ImageRequest
from tests.integration.conftest import APP_NAME, off_loop
from tests.integration.test_web_page import (  # noqa: F401 (browser: a fixture)
    ARTIFACTS, browser, fill_generate, set_range,
)
from tests.integration.test_inpainting import alpha_mask, as_white_is_edit, bomb, photo, pixels, png

pytestmark = pytest.mark.integration

GEN, EDIT = "/v1/images/generations", "/v1/images/edits"
SEED, STEPS = 7, 3


def lines(width: int, height: int) -> Image.Image:
    """A control image as a canny map looks: white lines on black."""
    values = np.zeros((height, width), np.uint8)
    values[height // 3, :] = values[:, width // 4] = values[:, 3 * width // 5] = 255
    values[2 * height // 3, width // 8 : 7 * width // 8] = 255
    return Image.fromarray(values).convert("RGB")


CONTROL = lines(512, 512)
B64 = base64.b64encode(png(CONTROL)).decode()


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


@pytest.mark.parametrize("field,value", [("control_image", B64), ("control_scale", 0.5),
                                         ("control_preprocess", "canny")])
def test_control_fields_without_a_controlnet_are_refused_naming_them(deployed, http, field, value):
    deployed(None)
    response = http.post(GEN, json={"prompt": "a boat", "size": "256x256", field: value})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == field and "ControlNet" in error["message"]
    edit = http.post(EDIT, data={"prompt": "x", "control_scale": "0.5"},
                     files={"image": ("in.png", png(photo(256, 256, 1)), "image/png")})
    assert edit.status_code == 400 and error_of(edit)["param"] == "control_scale"
    assert http.get("/page/settings").json()["controlnet"] is False  # the page hides its Control section


@pytest.fixture(scope="module")
def deployed(served):
    """`deployed(controlnet)`: the shared app with that `controlnet` setting (None: as the session
    deployed it), redeployed only when the app runs other args now; the session's args come back before
    the next test that needs them (tests/integration/conftest.py: `session_args`)."""

    def use(controlnet: str | None):
        return served.use(None if controlnet is None else {**served.args, "controlnet": controlnet})

    return use


@pytest.fixture()
def controlled(deployed):
    """The shared app with the tiny ControlNet (Union 2.x's layout: it inpaints too)."""
    return deployed("tiny")


@pytest.fixture()
def client(controlled):
    with openai.OpenAI(base_url=f"{controlled.url}/v1", api_key="unused", timeout=300, max_retries=0) as c:
        yield c


def test_the_official_client_generates_with_control_as_diffusers_does(client, diffusers_control):
    result = client.images.generate(prompt="a red boat on a lake", size="512x512", extra_body={
        "seed": SEED, "num_inference_steps": STEPS, "control_image": B64, "control_scale": 0.6})
    expected = diffusers_control("a red boat on a lake", control_image=CONTROL, controlnet_conditioning_scale=0.6,
                                 width=512, height=512, num_inference_steps=STEPS, guidance_scale=0.0,
                                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    ours = pixels(result.data[0].b64_json)
    assert np.abs(ours - np.asarray(expected).astype(np.int16)).max() <= 1
    plain = client.images.generate(prompt="a red boat on a lake", size="512x512",
                                   extra_body={"seed": SEED, "num_inference_steps": STEPS})
    assert np.abs(ours - pixels(plain.data[0].b64_json)).max() > 10  # the control changed it


def test_the_official_client_inpaints_with_control_as_diffusers_does(client, diffusers_control_inpaint):
    image, mask = photo(512, 512, 4), alpha_mask(512, 512, (96, 128, 416, 352))
    result = client.images.edit(image=("in.png", png(image), "image/png"), mask=("mask.png", png(mask), "image/png"),
                                prompt="a red boat", extra_body={"seed": SEED, "num_inference_steps": STEPS,
                                                                 "control_image": B64, "keep_unmasked": False})
    expected = diffusers_control_inpaint(
        "a red boat", image=image, mask_image=as_white_is_edit(mask), control_image=CONTROL, width=512, height=512,
        num_inference_steps=STEPS, guidance_scale=0.0,  # scale: 0.75
        generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.abs(pixels(result.data[0].b64_json) - np.asarray(expected).astype(np.int16)).max() <= 1


def test_canny_preprocessing_and_the_handle_api(controlled, client):
    """A plain photo with `control_preprocess: canny` is the same request as its canny map sent as is;
    the handle API's `control_image` gives the HTTP result."""
    from ray import serve

    scene = shapes()  # a photo whose edge map has edges: one of a flat photo is all black
    asked = {"seed": SEED, "num_inference_steps": 2, "control_scale": 0.9}
    from_photo = client.images.generate(prompt="a harbour", size="512x512", extra_body={
        **asked, "control_image": base64.b64encode(png(scene)).decode(), "control_preprocess": "canny"})
    from_edges = client.images.generate(prompt="a harbour", size="512x512", extra_body={
        **asked, "control_image": base64.b64encode(png(canny(scene))).decode()})
    assert from_photo.data[0].b64_json == from_edges.data[0].b64_json
    no_edges = client.images.generate(prompt="a harbour", size="512x512", extra_body={
        **asked, "control_image": base64.b64encode(png(Image.new("RGB", (512, 512)))).decode()})
    assert np.abs(pixels(from_photo.data[0].b64_json) - pixels(no_edges.data[0].b64_json)).max() > 10  # edges entered
    request = ImageRequest(prompt="a harbour", width=512, height=512, steps=2, seed=SEED, control_image=png(scene),
                           control_scale=0.9, control_preprocess="canny")
    result = off_loop(lambda: serve.get_app_handle(APP_NAME).generate.remote(request).result(timeout_s=300))
    assert result.images[0].data == base64.b64decode(from_photo.data[0].b64_json)


def test_bad_control_input_gets_an_error_naming_its_field(controlled, http):
    image = ("in.png", png(photo(512, 512, 1)), "image/png")
    mask = ("m.png", png(alpha_mask(512, 512, (0, 0, 128, 128))), "image/png")
    narrow_mask = alpha_mask(256, 512, (0, 0, 64, 64))  # another aspect than the image's
    cases = [
        (http.post(GEN, json={"prompt": "x", "control_image": base64.b64encode(b"not an image").decode()}),
         400, "control_image"),
        (http.post(GEN, json={"prompt": "x", "control_image": "%%% not base64"}), 400, "control_image"),
        (http.post(GEN, json={"prompt": "x", "control_scale": 0.5}), 400, "control_scale"),
        (http.post(GEN, json={"prompt": "x", "control_image": B64, "control_scale": 7}), 400, "control_scale"),
        (http.post(GEN, json={"prompt": "x", "control_image": B64, "control_preprocess": "depth"}), 400,
         "control_preprocess"),
        (http.post(EDIT, data={"prompt": "x"}, files={"image": image, "control_image": ("c.png", png(CONTROL))}),
         400, "control_image"),  # control over a whole upload: no reference pipeline
        (http.post(EDIT, data={"prompt": "x", "strength": "0.5"},
                   files={"image": image, "mask": mask, "control_image": ("c.png", png(CONTROL))}), 400, "strength"),
        (http.post(EDIT, data={"prompt": "x"}, files={"image": image, "mask": ("m.png", png(narrow_mask)),
                                                       "control_image": ("c.png", png(CONTROL))}), 400, "mask"),
        (http.post(EDIT, data={"prompt": "x"}, files={"image": image, "mask": mask,
                                                       "control_image": ("c.png", b"GIF89a not a png")}),
         400, "control_image"),
    ]
    bomb_file, over_cap = bomb(), b"\x89PNG" + b"0" * (controlled.args["api"]["max_upload_bytes"] + 10)
    cases += [
        (http.post(GEN, json={"prompt": "x", "control_image": base64.b64encode(bomb_file).decode()}), 400,
         "control_image"),  # refused from its header, not decoded
        (http.post(GEN, json={"prompt": "x", "control_image": base64.b64encode(over_cap).decode()}), 413,
         "control_image"),  # within the field's base64 cap, over the upload cap once decoded
        (http.post(GEN, json={"prompt": "x", "control_image": "A" * (base64_cap(len(over_cap)) + 4)}), 413,
         "control_image"),  # over the field's own cap
        (http.post(EDIT, data={"prompt": "x"}, files={"image": image, "mask": mask,
                                                       "control_image": ("c.png", bomb_file)}), 400, "control_image"),
        (http.post(EDIT, data={"prompt": "x"}, files={"image": image, "mask": mask,
                                                       "control_image": ("c.png", over_cap)}), 413, "control_image"),
        (http.post(EDIT, data={"prompt": "x"}, files={"image": image, "mask": ("m.png", png(alpha_mask(512, 512, None))),
                                                       "control_image": ("c.png", png(CONTROL))}), 400, "mask"),
    ]  # a mask with nothing to edit, last
    for response, status, param in cases:
        assert response.status_code == status, response.text
        assert error_of(response)["param"] == param, response.text


def huge_png(side: int) -> bytes:
    """A black 1-bit PNG of `side` x `side` pixels written row by row (about 50 KB at 20000: a
    decompression bomb, which nothing here decodes)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_1x1_control_image_is_resized_and_a_20000x20000_one_refused_and_the_replicas_keep_serving(controlled,
                                                                                                     http):
    """A 1x1 control image is fitted as any upload is (scaled up to the size asked, or without `size`
    to 512x512, the smallest fitted size), with canny and in an inpainting edit too; a 20000x20000 one
    is over the upload pixel cap and refused from its header, a 400 naming control_image. Afterwards the
    same replicas serve (no Ingress replica started again, the Denoiser's and VAE's processes the same)."""
    import glob

    from tests.integration.conftest import APP_NAME

    ingress_logs = lambda: set(glob.glob(f"{controlled.logs_dir()}/serve/replica_{APP_NAME}_Ingress_*.log"))  # noqa: E731
    before = (ingress_logs(), controlled.stats("Denoiser")["pid"], controlled.stats("VaeDecoder")["pid"])
    dot = base64.b64encode(png(Image.new("RGB", (1, 1), (255, 255, 255)))).decode()
    asked = {"prompt": "a red boat", "seed": SEED, "num_inference_steps": 1}
    for extra, size in (({"size": "640x512"}, (640, 512)), ({}, (512, 512)), ({"control_preprocess": "canny"}, (512, 512))):
        response = http.post(GEN, json={**asked, **extra, "control_image": dot})
        assert response.status_code == 200, response.text
        assert pixels(response.json()["data"][0]["b64_json"]).shape[:2] == (size[1], size[0])
    edit = http.post(EDIT, data={"prompt": "a red boat", "num_inference_steps": "1"}, files={
        "image": ("in.png", png(photo(512, 512, 1))), "mask": ("m.png", png(alpha_mask(512, 512, (0, 0, 128, 128)))),
        "control_image": ("c.png", png(Image.new("RGB", (1, 1))))})
    assert edit.status_code == 200, edit.text
    huge = huge_png(20_000)
    assert len(huge) < controlled.args["api"]["max_upload_bytes"]  # refused for its pixels, not its bytes
    for response in (http.post(GEN, json={**asked, "control_image": base64.b64encode(huge).decode()}),
                     http.post(EDIT, data={"prompt": "x"}, files={"image": ("in.png", png(photo(512, 512, 1))),
                                                                   "mask": ("m.png", png(alpha_mask(512, 512, None))),
                                                                   "control_image": ("c.png", huge)})):
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert (error["param"], error["code"]) == ("control_image", "image_too_large") and "limit" in error["message"]
    again = http.post(GEN, json={**asked, "size": "512x512", "control_image": B64})
    assert again.status_code == 200, again.text
    assert (ingress_logs(), controlled.stats("Denoiser")["pid"], controlled.stats("VaeDecoder")["pid"]) == before


def test_loadgen_controlled_requests_are_served(controlled, tmp_path):
    """The load generator's `--control-fraction` bodies (its default photo, canny on the server) against
    the real app: every request succeeds, half of them controlled."""
    import asyncio

    from benchmarks.loadgen import LoadConfig, parse_size_mix, run_load

    report = asyncio.run(run_load(LoadConfig(
        url=controlled.url, concurrency=2, requests=4, size_mix=parse_size_mix("512x512"), steps=1,
        prompts=["a harbour at night", "a red boat"], control_fraction=0.5, shuffle_seed=9, timeout_s=300)))
    assert (report.ok, report.failed) == (4, 0), report.error_samples
    assert report.latency_by_control["control"].count == 2 and report.latency_by_control["plain"].count == 2


def test_a_big_control_image_fits_the_raised_json_cap(controlled, http):
    """The JSON body cap (64 KiB in these tests) is raised for control_image alone: a control image of
    several times that passes, and other fields over the cap are still a 413."""
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))  # incompressible: ~197 KB PNG
    encoded = base64.b64encode(png(noisy)).decode()
    assert len(encoded) > 4 * controlled.args["api"]["max_body_bytes"]
    ok = http.post(GEN, json={"prompt": "x", "size": "512x512", "num_inference_steps": 1, "control_image": encoded})
    assert ok.status_code == 200, ok.text
    big_prompt = http.post(GEN, json={"prompt": "x" * 70_000, "control_image": encoded})
    assert big_prompt.status_code == 413, big_prompt.text


SHAPES = [(64, 80, 240, 272), (288, 192, 464, 432)]  # left, top, right, bottom: two filled rectangles


def shapes() -> Image.Image:
    """A photo for the canny preview: flat colours with sharp borders, so its edge map has edges
    exactly along the rectangles' borders and none elsewhere."""
    from PIL import ImageDraw

    image = Image.new("RGB", (512, 512), (70, 110, 150))
    draw = ImageDraw.Draw(image)
    for (left, top, right, bottom), colour in zip(SHAPES, [(235, 205, 40), (15, 15, 15)]):
        draw.rectangle((left, top, right - 1, bottom - 1), fill=colour)
    return image


# Keeps the JSON body of the page's next generation request.
RECORD_GENERATION = """() => {
  const original = window.fetch;
  window.sent = null;
  window.fetch = async (path, init) => {
    if (String(path).endsWith("v1/images/generations")) window.sent = JSON.parse(init.body);
    return original(path, init);
  };
}"""


def test_the_page_control_section_previews_canny_and_sends_control(controlled, browser, http, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    scene = shapes()
    upload = tmp_path / "scene.png"
    scene.save(upload)
    direct_preview = http.post("/page/control-preview", json={"control_image": base64.b64encode(png(scene)).decode()})
    assert direct_preview.status_code == 200 and direct_preview.headers["content-type"] == "image/png", \
        direct_preview.text
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(controlled.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("#g-control", state="attached")
    assert page.is_visible("#g-control") and page.is_hidden("#panel-transform")
    page.click("#g-control summary")
    page.set_input_files("#g-control-file", str(upload))
    page.check("#g-control-canny")
    page.wait_for_function("() => !document.getElementById('g-control-status').textContent.startsWith('Finding')",
                           timeout=120_000)
    assert page.inner_text("#g-control-status").startswith("The edges"), page.inner_text("#g-control-status")
    shown = page.evaluate("""async () => {
      const blob = await (await fetch(document.getElementById('g-control-preview').src)).blob();
      let text = ''; for (const b of new Uint8Array(await blob.arrayBuffer())) text += String.fromCharCode(b);
      return btoa(text);
    }""")
    preview = np.asarray(Image.open(__import__("io").BytesIO(base64.b64decode(shown))).convert("L"))
    assert preview.shape == (512, 512)
    edge = preview > 127
    for left, top, right, bottom in SHAPES:  # each border of each shape has edges, within 2 px
        for line in (edge[top - 2 : top + 3, left + 8 : right - 8], edge[bottom - 3 : bottom + 2, left + 8 : right - 8],
                     edge[top + 8 : bottom - 8, left - 2 : left + 3].T, edge[top + 8 : bottom - 8, right - 3 : right + 2].T):
            assert line.any(axis=0).mean() > 0.95, "a shape's border has no edges in the preview"
    flat = np.ones_like(edge)  # away from the borders: the background and the shapes' insides
    for left, top, right, bottom in SHAPES:
        flat[top - 4 : bottom + 4, left - 4 : right + 4] = False
        flat[top + 4 : bottom - 4, left + 4 : right - 4] = True
    assert edge.sum() > 1000 and not edge[flat].any()
    assert np.array_equal(preview, np.asarray(canny(scene).convert("L")))  # the server's own edge map
    set_range(page, "#g-control-scale", 0.6)
    fill_generate(page, "a harbour at night", seed=3)
    page.evaluate(RECORD_GENERATION)
    page.click("#panel-generate button[type=submit]")
    sent = page.wait_for_function("() => window.sent").json_value()
    assert sent["control_preprocess"] == "canny" and sent["control_scale"] == 0.6
    assert base64.b64decode(sent["control_image"]) == upload.read_bytes()
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=120_000)
    assert page.is_hidden("#error")
    page.screenshot(path=str(ARTIFACTS / "page-control.png"), full_page=True)
    result = page.get_attribute("#cards .frame img", "src").split(",", 1)[1]
    direct = http.post(GEN, json={k: v for k, v in sent.items() if k not in ("stream", "partial_images", "stream_progress")})
    assert direct.status_code == 200, direct.text
    assert np.array_equal(pixels(result), pixels(direct.json()["data"][0]["b64_json"]))


def page_settings_once_known(http) -> dict:
    """/page/settings once the Ingress has the ControlNet's channels (asked of the Denoiser when it is ready)."""
    import time

    deadline = time.monotonic() + 60
    while (settings := http.get("/page/settings").json())["control_channels"] is None:
        assert time.monotonic() < deadline, settings
        time.sleep(0.5)
    return settings


def test_transform_takes_a_control_image_only_with_a_mask(controlled, browser, http, tmp_path):
    """A ControlNet that inpaints (33 channels, as /page/settings says): Transform's Control section takes a
    control image only once a mask is painted, and the edit it then sends (mask and control image, no
    strength) is answered as the API answers it: no form the server would refuse."""
    from tests.integration.test_web_page import RECORD_EDIT, _drag

    settings = page_settings_once_known(http)
    assert (settings["control_channels"], settings["controlnet_inpaints"]) == (33, True)
    upload, control = tmp_path / "in.png", tmp_path / "control.png"
    photo(512, 512, 5).save(upload)
    CONTROL.save(control)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(controlled.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tab-transform")
    page.set_input_files("#t-file", str(upload))
    page.wait_for_selector("#t-mask-canvas", state="visible")
    page.click("#t-control summary")
    assert page.is_disabled("#t-control-file") and page.is_visible("#t-control-needs")
    _drag(page, "#t-mask-canvas", [(0.2, 0.5), (0.8, 0.5)])
    assert page.is_enabled("#t-control-file") and page.is_hidden("#t-control-needs")
    page.set_input_files("#t-control-file", str(control))
    page.fill("#t-prompt", "a boat along the lines")
    set_range(page, "#t-steps", 2)
    page.fill("#t-seed", "9")
    page.evaluate(RECORD_EDIT)
    page.click("#panel-transform button[type=submit]")
    sent = page.wait_for_function("() => window.sent").json_value()
    assert "strength" not in sent["fields"] and sent["mask"]
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=120_000)
    assert page.is_hidden("#error")
    shown = page.get_attribute("#cards .frame img", "src").split(",", 1)[1]
    page.screenshot(path=str(ARTIFACTS / "page-transform-control.png"), full_page=True)
    fields = {k: sent["fields"][k] for k in ("prompt", "style", "control_scale", "num_inference_steps", "seed")}
    direct = http.post(EDIT, data=fields, files={
        "image": ("in.png", upload.read_bytes(), "image/png"),
        "mask": ("mask.png", base64.b64decode(sent["mask"]), "image/png"),
        "control_image": ("control.png", control.read_bytes(), "image/png")})
    assert direct.status_code == 200, direct.text
    assert np.array_equal(pixels(shown), pixels(direct.json()["data"][0]["b64_json"]))


@pytest.fixture()
def control_only(served, last_args):
    """The shared app with a ControlNet of Union 1.0's layout: 16 control channels, no mask (and the S3
    image store of test_image_urls.py's last tests, which run on the same args: conftest's `last_args`)."""
    args, deployments, _ = last_args
    return served.use(args, deployments)


def test_a_controlnet_without_mask_channels_refuses_edits_with_control(control_only, http, browser):
    """It controls generations but cannot inpaint: an edit with a control image (with a mask or
    without) is a 400 naming control_image from the Ingress's planning, over HTTP and the handle API,
    while generations with control and edits with a mask alone still run; the page's settings say so, and
    its Transform tab offers no Control section."""
    from ray import serve

    image, mask = png(photo(512, 512, 1)), png(alpha_mask(512, 512, (96, 128, 416, 352)))
    control = ("c.png", png(CONTROL), "image/png")
    for files in ({"image": ("in.png", image), "mask": ("m.png", mask), "control_image": control},
                  {"image": ("in.png", image), "control_image": control}):
        response = http.post(EDIT, data={"prompt": "x", "num_inference_steps": "1"}, files=files)
        assert response.status_code == 400, response.text
        error = error_of(response)
        assert (error["param"], error["code"]) == ("control_image", "controlnet_cannot_inpaint"), error
        assert "cannot inpaint" in error["message"] and "16 control channels" in error["message"]
    request = ImageRequest(prompt="x", init_image=image, mask=mask, control_image=png(CONTROL), steps=1)
    with pytest.raises(Exception, match="cannot inpaint: it takes no mask"):
        off_loop(lambda: serve.get_app_handle(APP_NAME).generate.remote(request).result(timeout_s=120))
    asked = {"prompt": "a red boat", "size": "512x512", "seed": SEED, "num_inference_steps": 1}
    with_control = http.post(GEN, json={**asked, "control_image": B64})
    plain = http.post(GEN, json=asked)
    assert with_control.status_code == plain.status_code == 200, with_control.text
    assert np.abs(pixels(with_control.json()["data"][0]["b64_json"])
                  - pixels(plain.json()["data"][0]["b64_json"])).max() > 10  # the control entered
    inpainted = http.post(EDIT, data={"prompt": "x", "num_inference_steps": "1"},
                          files={"image": ("in.png", image), "mask": ("m.png", mask)})
    assert inpainted.status_code == 200, inpainted.text
    settings = page_settings_once_known(http)  # the page offers control on Generate only
    assert (settings["control_channels"], settings["controlnet_inpaints"]) == (16, False)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(control_only.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_visible("#g-control")
    page.click("#tab-transform")
    assert page.locator("#t-control").count() == 1 and page.is_hidden("#t-control")
