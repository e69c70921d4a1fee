"""The web page at `/` in a real headless Chromium (Debian's package, driven by Playwright) against
the served app: generate with live progress, transform an upload, an API error, keyboard tabs, a
phone-width screen, and keys switched on. Screenshots go to tests/artifacts/ (git-ignored).

Without /usr/bin/chromium the test fails; ZIMAGE_SKIP_BROWSER=1 skips it explicitly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("ZIMAGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

# Records every step count and partial image the page shows, however fast they pass.
WATCH_PROGRESS = """() => {
  window.seen = {steps: [], partials: 0};
  new MutationObserver(() => {
    for (const el of document.querySelectorAll('#cards .steps')) {
      if (window.seen.steps.at(-1) !== el.textContent) window.seen.steps.push(el.textContent);
    }
    for (const img of document.querySelectorAll('#cards img[alt^="Partial image"]')) {
      if (img.dataset.counted !== img.src.length + img.alt) { img.dataset.counted = img.src.length + img.alt; window.seen.partials++; }
    }
  }).observe(document.getElementById('cards'), {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("ZIMAGE_SKIP_BROWSER") == "1":
        pytest.skip("ZIMAGE_SKIP_BROWSER=1")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium package (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def set_range(page, selector: str, value: int) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))


def fill_generate(page, prompt: str, seed: int, side: int = 512, steps: int = 4) -> None:
    """The Generate form: a prompt, a custom square size, the steps and a fixed seed."""
    page.fill("#g-prompt", prompt)
    page.select_option("#g-aspect", "custom")
    page.fill("#g-width", str(side))
    page.fill("#g-height", str(side))
    set_range(page, "#g-steps", steps)
    page.fill("#g-seed", str(seed))


# Every element wider than the viewport (none fits a phone-width screen).
OVERFLOWING = """() => Array.from(document.querySelectorAll('body *'))
    .filter(el => el.getClientRects().length && el.getBoundingClientRect().right > window.innerWidth + 1)
    .map(el => el.id || el.className || el.tagName)"""

# Every shown control whose text does not fit its box: a select's longest option (beside its arrow), an
# input's value or placeholder (beside a number's spinner), any other box's content (its scroll width).
CLIPPED = """() => {
  const pen = document.createElement('canvas').getContext('2d');
  const textWidth = (el, text) => { pen.font = getComputedStyle(el).font; return pen.measureText(text).width; };
  const room = (el) => { const s = getComputedStyle(el);
    return el.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight); };
  const clipped = [];
  for (const el of document.querySelectorAll('select, input, textarea, button, label, summary, output, a, p, dd')) {
    if (!el.getClientRects().length || getComputedStyle(el).display === 'inline') continue;
    const name = el.id || el.textContent.trim().slice(0, 30) || el.tagName;
    if (el.tagName === 'SELECT') {
      const longest = Math.max(0, ...Array.from(el.options, (o) => textWidth(el, o.text)));
      if (longest > room(el) - 20) clipped.push(name + ': option of ' + Math.round(longest) + ' px in ' + room(el));
    } else if (el.tagName === 'INPUT' && ['text', 'number', 'password'].includes(el.type)) {
      const text = el.value || el.placeholder;
      const spinner = el.type === 'number' ? 20 : 0;
      if (text && textWidth(el, text) > room(el) - spinner) clipped.push(name + ': "' + text + '"');
    } else if (el.scrollWidth > el.clientWidth + 1) {
      clipped.push(name + ': ' + el.scrollWidth + ' px in ' + el.clientWidth);
    }
  }
  return clipped;
}"""

# Whether the element is (at least partly) on screen.
IN_VIEW = """(selector) => { const box = document.querySelector(selector).getBoundingClientRect();
  return box.bottom > 0 && box.top < window.innerHeight; }"""

# The submit button of a tab, as the page leaves it: [disabled, aria-busy, label].
BUTTON_STATE = """(form) => { const b = document.querySelector(form + ' button[type=submit]');
  return [b.disabled, b.getAttribute('aria-busy'), b.textContent]; }"""


def upload_png(tmp_path: Path) -> Path:
    ys, xs = np.mgrid[0:640, 0:512]
    pixels = np.stack([xs * 255 // 511, ys * 255 // 639, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    path = tmp_path / "upload.png"
    Image.fromarray(pixels).save(path)
    return path


def test_the_page_generates_transforms_reports_errors_and_fits_a_phone(served, browser, tmp_path):
    """Generate and Transform at 1280 px, then both tabs at 390 px: a result or an error arrives in view,
    the submit button is back as it was after each outcome (an image, an API error, a dropped connection),
    and every control's text fits its box. Screenshots of both tabs at both widths go to the artifacts."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_visible("#random-banner")  # tiny has random weights
    assert page.locator("#g-aspect option").count() == 19  # the 18 presets and "Custom"
    assert "Watercolor" in page.locator("#g-style").inner_text()
    assert page.evaluate(CLIPPED) == []

    # keyboard: the tablist switches with the arrow keys
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#tab-transform", "aria-selected") == "true" and page.is_visible("#panel-transform")
    assert page.evaluate("document.activeElement.id") == "tab-transform"
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#panel-generate") and not page.is_visible("#panel-transform")

    # generate: an example fills the form; a custom small size, 4 steps, seed 7; progress is watched
    ready_button = [False, None, "Generate"]
    assert page.evaluate(BUTTON_STATE, "#panel-generate") == ready_button
    page.click("#examples button >> nth=0")
    assert "lighthouse" in page.input_value("#g-prompt")
    page.select_option("#g-aspect", "custom")
    page.fill("#g-width", "512")
    page.fill("#g-height", "512")
    set_range(page, "#g-steps", 4)
    page.fill("#g-seed", "7")
    page.evaluate(WATCH_PROGRESS)
    page.click("#panel-generate button[type=submit]")
    assert page.evaluate(BUTTON_STATE, "#panel-generate") == [True, "true", "Generate…"]
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=60_000)
    assert page.evaluate(BUTTON_STATE, "#panel-generate") == ready_button  # back with the image, not later
    assert page.inner_text("#cards .seed") == "7"
    assert page.get_attribute("#cards .frame img", "src").startswith("data:image/png;base64,")
    seen = page.evaluate("window.seen")
    assert "Step 1 of 4" in seen["steps"] and "Step 4 of 4" in seen["steps"], seen
    assert seen["partials"] >= 1, seen
    page.screenshot(path=str(ARTIFACTS / "page-generate-1280.png"), full_page=True)

    # an error from the API is shown as it comes, the whole size rule in it; then a dropped connection
    page.fill("#g-width", "500")
    page.click("#panel-generate button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert "not a multiple of 16" in page.inner_text("#error") and "512..2048" in page.inner_text("#error")
    assert page.evaluate(BUTTON_STATE, "#panel-generate") == ready_button
    page.fill("#g-width", "512")
    page.route("**/v1/images/generations", lambda route: route.abort())
    before = page.inner_text("#error")
    page.click("#panel-generate button[type=submit]")
    page.wait_for_function("(before) => { const e = document.getElementById('error');"
                           " return !e.hidden && e.textContent && e.textContent !== before; }", arg=before)
    assert page.evaluate(BUTTON_STATE, "#panel-generate") == ready_button
    page.unroute("**/v1/images/generations")

    # transform an uploaded file, shown once with its mask canvas over it: the result follows its size
    page.click("#tab-transform")
    page.set_input_files("#t-file", str(upload_png(tmp_path)))
    page.wait_for_selector("#t-preview", state="visible")  # once the file has loaded
    assert page.locator("#panel-transform img:visible").count() == 1 and page.is_visible("#t-mask-canvas")
    image_box, canvas_box = page.locator("#t-preview").bounding_box(), page.locator("#t-mask-canvas").bounding_box()
    assert all(abs(image_box[k] - canvas_box[k]) <= 1 for k in ("x", "y", "width", "height"))
    page.fill("#t-prompt", "the same gradient at night")
    set_range(page, "#t-steps", 4)
    page.fill("#t-seed", "3")
    page.click("#panel-transform button[type=submit]")
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=60_000)
    assert page.evaluate(BUTTON_STATE, "#panel-transform") == [False, None, "Transform"]
    assert page.is_hidden("#error")
    assert page.inner_text("#cards .seed") == "3"
    assert "512x640" in page.inner_text("#cards .meta")
    assert page.locator("#history li").count() == 2
    assert page.evaluate(CLIPPED) == []
    page.screenshot(path=str(ARTIFACTS / "page-transform-1280.png"), full_page=True)

    # a phone-width screen: nothing wider than the viewport, nothing clipped, on either tab
    page.set_viewport_size({"width": 390, "height": 844})
    page.click("#tab-generate")
    assert page.evaluate(OVERFLOWING) == [] and page.evaluate(CLIPPED) == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "page-generate-390.png"), full_page=True)
    page.click("#tab-transform")
    assert page.evaluate(OVERFLOWING) == [] and page.evaluate(CLIPPED) == []
    page.screenshot(path=str(ARTIFACTS / "page-transform-390.png"), full_page=True)

    # on the phone the form's button is far above the result and below the error: each comes into view
    page.eval_on_selector("#panel-transform button[type=submit]", "b => b.scrollIntoView({block: 'end'})")
    assert not page.evaluate(IN_VIEW, "#cards")
    page.fill("#t-seed", "4")
    page.click("#panel-transform button[type=submit]")
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=60_000)
    page.wait_for_function(IN_VIEW, arg="#cards .card", timeout=5_000)
    page.fill("#t-seed", "-4")
    page.eval_on_selector("#panel-transform button[type=submit]", "b => b.scrollIntoView({block: 'end'})")
    assert not page.evaluate(IN_VIEW, "#error")
    page.click("#panel-transform button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    page.wait_for_function(IN_VIEW, arg="#error", timeout=5_000)
    assert page.evaluate(BUTTON_STATE, "#panel-transform") == [False, None, "Transform"]
    print(f"screenshots in {ARTIFACTS}")


def test_with_keys_on_the_page_loads_without_one_and_sends_the_key_typed(served, browser):
    """Keys switched on live (an Ingress user_config override of the key digests): the page and its
    settings load without a key, the key box opens, a request without a key shows the API's 401
    message, and with the typed key the same request succeeds."""
    import hashlib

    digest = hashlib.sha256(b"page-test-key").hexdigest()
    served.deploy([{"name": "Ingress", "user_config": {"api": {"api_key_sha256": [digest]}}}])
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(served.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.get_attribute("#key-box", "open") is not None  # the key box opens by itself
        page.fill("#g-prompt", "a lighthouse behind a key")
        page.select_option("#g-aspect", "custom")
        page.fill("#g-width", "512")
        page.fill("#g-height", "512")
        set_range(page, "#g-steps", 4)
        page.click("#panel-generate button[type=submit]")
        # read the shown error in the same evaluation that sees it shown: the page's load already showed
        # one (the 401 that opened the key box), and the submit clears it (hidden, emptied) before
        # showing its own, so a wait for a visible #error followed by a separate read could fall between
        shown = page.wait_for_function("() => { const e = document.getElementById('error');"
                                       " return !e.hidden && e.textContent ? e.textContent : null; }")
        assert "API key" in shown.json_value()
        page.fill("#api-key", "page-test-key")
        page.click("#key-save")
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#cards .meta:not([hidden])", timeout=60_000)
        assert page.is_hidden("#error")
    finally:
        served.deploy()


def test_under_a_route_prefix_the_page_loads_and_generates_with_every_request_under_it(served, browser):
    """The shared app moved to the route prefix /zimage (as a proxy's root_path would place it): the page
    at /zimage (redirected to /zimage/) gets its files, settings and listings and streams an image, with
    no request outside the prefix and none failed."""
    prefix = "/zimage"
    served.deploy(route_prefix=prefix)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requested, failed = [], []

        def answered(response) -> None:
            if response.status >= 400:
                failed.append(f"{response.url}: {response.status}")

        page.on("request", lambda request: requested.append(request.url))
        page.on("requestfailed", lambda request: failed.append(f"{request.url}: {request.failure}"))
        page.on("response", answered)
        page.goto(served.url + prefix)
        assert failed == []  # the page's own files, loaded by now
        page.wait_for_selector("body[data-ready=true]")
        assert page.evaluate("document.baseURI") == served.url + prefix + "/"
        assert page.evaluate("getComputedStyle(document.querySelector('.tabs')).display") == "flex"  # style.css
        assert page.is_visible("#random-banner") and "Watercolor" in page.locator("#g-style").inner_text()
        assert page.locator("#g-aspect option").count() == 19

        fill_generate(page, "a lighthouse under a prefix", seed=13)
        page.click("#panel-generate button[type=submit]")
        page.wait_for_selector("#cards .meta:not([hidden])", timeout=60_000)
        assert page.is_hidden("#error") and page.inner_text("#cards .seed") == "13"
        assert any(url == served.url + prefix + "/v1/images/generations" for url in requested)
        under = served.url + prefix
        assert [url for url in requested if url != under and not url.startswith((under + "/", "data:"))] == []
        assert failed == []
        page.screenshot(path=str(ARTIFACTS / "page-under-prefix.png"), full_page=True)
    finally:
        served.deploy()


# ---- the Transform tab's mask brush (serve_app/web/mask.js) ----------------------------------------


def _drag(page, selector: str, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through `points`, given as fractions of the element's box (measured now: a click
    elsewhere may have scrolled the page)."""
    element = page.locator(selector)
    element.scroll_into_view_if_needed()
    box = element.bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for point in at[1:]:
        page.mouse.move(*point, steps=8)
    page.mouse.up()


# Keeps what the page's next edit request sends (its FormData's text fields, and the mask as base64):
# Chromium does not hand Playwright a multipart body that holds files.
RECORD_EDIT = """() => {
  const original = window.fetch;
  window.sent = null;
  window.fetch = async (path, init) => {
    if (String(path).endsWith("v1/images/edits")) {
      const fields = {};
      let mask = null;
      for (const [key, value] of init.body.entries()) {
        if (!(value instanceof Blob)) fields[key] = value;
        else if (key === "mask") {
          let text = "";
          for (const byte of new Uint8Array(await value.arrayBuffer())) text += String.fromCharCode(byte);
          mask = btoa(text);
        }
      }
      window.sent = {fields, mask};
    }
    return original(path, init);
  };
}"""


def test_the_brush_paints_a_mask_that_the_transform_sends(served, browser, http, tmp_path):
    """Paint a horizontal band, erase across its middle, invert twice, clear and paint again: the edit
    carries the painting as OpenAI's mask (upload-sized PNG, transparent where painted), and the
    result is what the API gives for that very mask."""
    import base64
    import io

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tab-transform")
    assert page.is_hidden("#t-mask")  # no upload, no brush
    upload = upload_png(tmp_path)
    page.set_input_files("#t-file", str(upload))
    page.wait_for_selector("#t-mask", state="visible")
    page.wait_for_selector("#t-mask-canvas", state="visible")
    assert page.evaluate("[document.getElementById('t-mask-canvas').width,"
                         " document.getElementById('t-mask-canvas').height]") == [512, 640]
    status = lambda: page.inner_text("#t-mask-status")  # noqa: E731
    assert "Nothing painted" in status()

    def paint_band_and_erase_its_middle() -> None:
        set_range(page, "#t-mask-size", 60)
        _drag(page, "#t-mask-canvas", [(0.1, 0.5), (0.9, 0.5)])
        page.check("#t-mask-erase")
        _drag(page, "#t-mask-canvas", [(0.5, 0.3), (0.5, 0.7)])
        page.uncheck("#t-mask-erase")

    paint_band_and_erase_its_middle()
    painted = status()
    assert "Repaints" in painted and page.input_value("#t-strength") == "1"
    share = float(painted.split("Repaints ")[1].split("%")[0])
    page.click("#t-mask-invert")
    inverted = float(status().split("Repaints ")[1].split("%")[0])
    assert abs(share + inverted - 100) <= 1
    page.click("#t-mask-invert")
    assert status() == painted
    page.click("#t-mask-clear")
    assert "Nothing painted" in status()
    paint_band_and_erase_its_middle()
    page.screenshot(path=str(ARTIFACTS / "page-mask-brush.png"), full_page=True)

    page.fill("#t-prompt", "a boat where the band is")
    set_range(page, "#t-steps", 4)
    page.fill("#t-seed", "5")
    page.evaluate(RECORD_EDIT)
    page.click("#panel-transform button[type=submit]")
    sent = page.wait_for_function("() => window.sent").json_value()
    mask_png = base64.b64decode(sent["mask"])
    mask = Image.open(io.BytesIO(mask_png))
    assert mask.format == "PNG" and mask.size == (512, 640) and mask.mode == "RGBA"
    alpha = np.asarray(mask.getchannel("A"))
    assert set(np.unique(alpha)) == {0, 255}
    assert alpha[320, 100] == 0 and alpha[320, 400] == 0  # the band, left and right of the erased cut
    assert alpha[320, 256] == 255 and alpha[20, 20] == 255 and alpha[620, 500] == 255  # the cut, the corners
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=60_000)
    assert page.is_hidden("#error")
    shown = page.get_attribute("#cards .frame img", "src").split(",", 1)[1]
    page.screenshot(path=str(ARTIFACTS / "page-inpaint.png"), full_page=True)

    fields = {k: sent["fields"][k] for k in ("prompt", "style", "strength", "num_inference_steps", "seed")}
    assert fields["strength"] == "1" and fields["seed"] == "5"
    direct = http.post("/v1/images/edits", data=fields, files={"image": ("upload.png", upload.read_bytes(), "image/png"),
                                                              "mask": ("mask.png", mask_png, "image/png")})
    assert direct.status_code == 200, direct.text
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(direct.json()["data"][0]["b64_json"]))))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(shown)))), expected)


def test_transform_makes_the_number_of_images_asked_for(served, browser, http, tmp_path):
    """"Number of images" on the Transform tab: capped by the server's limit, and 3 asked for give 3
    results, seeds s, s+1, s+2, each pixel for pixel the image the API's n=3 edit gives at that index."""
    import base64
    import io

    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.click("#tab-transform")
    assert page.get_attribute("#t-n", "max") == str(served.args["api"]["max_images_per_request"])
    upload = upload_png(tmp_path)
    page.set_input_files("#t-file", str(upload))
    page.wait_for_selector("#t-preview", state="visible")
    page.fill("#t-prompt", "three gradients at dusk")
    set_range(page, "#t-steps", 4)
    page.fill("#t-seed", "11")
    page.fill("#t-n", "3")
    page.click("#panel-transform button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#cards .meta:not([hidden])').length === 3",
                           timeout=120_000)
    assert page.is_hidden("#error")
    assert page.locator("#cards .seed").all_inner_texts() == ["11", "12", "13"]
    shown = [src.split(",", 1)[1] for src in page.eval_on_selector_all("#cards .frame img", "els => els.map(e => e.src)")]
    page.screenshot(path=str(ARTIFACTS / "page-transform-n.png"), full_page=True)

    fields = {"prompt": "three gradients at dusk", "style": page.input_value("#t-style"), "strength": "0.6",
              "num_inference_steps": "4", "seed": "11", "n": "3"}
    direct = http.post("/v1/images/edits", data=fields, files={"image": ("upload.png", upload.read_bytes(), "image/png")})
    assert direct.status_code == 200, direct.text
    expected = [item["b64_json"] for item in direct.json()["data"]]
    assert len(expected) == len(shown) == 3
    for got, want in zip(shown, expected):
        got_pixels, want_pixels = (np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in (got, want))
        assert got_pixels.shape == (640, 512, 3) and np.array_equal(got_pixels, want_pixels)
    assert not np.array_equal(*(np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in shown[:2]))


# ---- the LoRA picker (serve_app/web/lora.js) ---------------------------------------------------------


@pytest.fixture(scope="module")
def page_loras(served, cache_dir, pipeline) -> list[str]:
    """Five adapters (one more than a request may use by default), both formats, written into the
    served app's adapter directory while it serves."""
    from deployments.denoiser.lora.random_adapters import diffusers_state, kohya_state, random_factors, write

    transformer = pipeline.loop.transformer
    names = [f"page-{i}" for i in range(5)]
    for i, name in enumerate(names):
        factors = random_factors(transformer, rank=4, seed=40 + i)
        write(cache_dir / "loras", name, diffusers_state(factors) if i % 2 else kohya_state(factors, alpha=4.0))
    return names


def _pixels(b64: str) -> np.ndarray:
    import base64
    import io

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def _shown(page) -> np.ndarray:
    return _pixels(page.get_attribute("#cards .frame img", "src").split(",", 1)[1])


def _ready_page(served, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return page


def test_the_lora_picker_is_hidden_when_the_server_offers_no_adapter(served, browser):
    """The page as it is against a server whose GET /v1/loras lists nothing (answered here by the
    browser's route, as the shared app's directory holds other tests' adapters)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.route("**/v1/loras", lambda route: route.fulfill(json={"object": "list", "data": []}))
    page.goto(served.url + "/")
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#g-loras").count() == 1 and page.is_hidden("#g-loras") and page.is_hidden("#t-loras")


def test_generate_with_adapters_picked_on_the_page_equals_the_api(served, browser, http, page_loras):
    """Up to the server's cap can be chosen; two adapters with their scales go out as `loras`, and the
    page's image is pixel for pixel the API's for the same seed and adapters, unlike the image without."""
    ARTIFACTS.mkdir(exist_ok=True)
    cap = http.get("/page/settings").json()["max_loras"]
    assert cap == 4  # the API's default, fewer than the five adapters offered
    page = _ready_page(served, browser)
    assert page.is_hidden("#g-loras-list")  # closed until asked for
    page.click("#g-loras summary")
    for name in page_loras:
        assert page.is_visible(f"#g-lora-{name}") and page.is_hidden(f"#g-lora-{name}-scale")
    assert "page-1 (rank 4)" in page.inner_text("#g-loras-list")
    for name in page_loras[:cap]:
        page.check(f"#g-lora-{name}")
    unticked = "#g-loras-list input[type=checkbox]:not(:checked)"
    assert page.eval_on_selector_all(unticked, "els => els.length > 0 && els.every(e => e.disabled)")
    assert page.inner_text("#g-loras summary").endswith(f"({cap} chosen)")
    page.uncheck(f"#g-lora-{page_loras[0]}")
    page.uncheck(f"#g-lora-{page_loras[1]}")
    assert page.eval_on_selector_all(unticked, "els => els.every(e => !e.disabled)")
    page.uncheck(f"#g-lora-{page_loras[3]}")
    page.check(f"#g-lora-{page_loras[4]}")
    assert page.input_value(f"#g-lora-{page_loras[2]}-scale") == "1"  # the default scale
    set_range(page, f"#g-lora-{page_loras[2]}-scale", -0.75)
    set_range(page, f"#g-lora-{page_loras[4]}-scale", 1.5)
    assert page.inner_text(f"#g-lora-{page_loras[4]}-scale-value") == "1.5"
    assert page.is_hidden("#t-loras-list") and not page.is_checked(f"#t-lora-{page_loras[2]}")  # its own per tab

    fill_generate(page, "a lighthouse in two styles", seed=21)
    with page.expect_request("**/v1/images/generations") as sent:
        page.click("#panel-generate button[type=submit]")
    body = sent.value.post_data_json
    wanted = [{"name": page_loras[2], "scale": -0.75}, {"name": page_loras[4], "scale": 1.5}]
    assert body["loras"] == wanted
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=120_000)
    assert page.is_hidden("#error")
    assert f"{page_loras[2]} × -0.75, {page_loras[4]} × 1.5" in page.inner_text("#cards .meta")
    page.screenshot(path=str(ARTIFACTS / "page-loras.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # the open picker fits a phone-width screen
    assert page.evaluate(OVERFLOWING) == []

    request = {k: body[k] for k in ("prompt", "size", "style", "seed", "num_inference_steps", "loras")}
    direct = http.post("/v1/images/generations", json=request)
    assert direct.status_code == 200, direct.text
    assert direct.json()["data"][0]["loras"] == wanted
    shown = _shown(page)
    assert np.array_equal(shown, _pixels(direct.json()["data"][0]["b64_json"]))
    plain = http.post("/v1/images/generations", json={k: v for k, v in request.items() if k != "loras"})
    assert plain.status_code == 200, plain.text
    assert "loras" not in plain.json()["data"][0]
    assert np.abs(shown - _pixels(plain.json()["data"][0]["b64_json"])).max() > 20


def test_transform_with_an_adapter_picked_on_the_page_equals_the_api(served, browser, http, page_loras, tmp_path):
    """The edit's multipart form carries the chosen adapter as the `loras` field (JSON); the result is
    the API's edit with it, pixel for pixel, and not the edit without it."""
    import json

    page = _ready_page(served, browser)
    page.click("#tab-transform")
    upload = upload_png(tmp_path)
    page.set_input_files("#t-file", str(upload))
    page.wait_for_selector("#t-preview", state="visible")
    page.click("#t-loras summary")
    page.check(f"#t-lora-{page_loras[1]}")
    set_range(page, f"#t-lora-{page_loras[1]}-scale", 0.5)
    page.fill("#t-prompt", "the gradient, restyled")
    set_range(page, "#t-steps", 4)
    page.fill("#t-seed", "9")
    page.evaluate(RECORD_EDIT)
    page.click("#panel-transform button[type=submit]")
    sent = page.wait_for_function("() => window.sent").json_value()["fields"]
    assert json.loads(sent["loras"]) == [{"name": page_loras[1], "scale": 0.5}]
    page.wait_for_selector("#cards .meta:not([hidden])", timeout=120_000)
    assert page.is_hidden("#error")
    shown = _shown(page)

    fields = {k: sent[k] for k in ("prompt", "style", "strength", "num_inference_steps", "seed", "loras")}
    files = {"image": ("upload.png", upload.read_bytes(), "image/png")}
    direct = http.post("/v1/images/edits", data=fields, files=files)
    assert direct.status_code == 200, direct.text
    assert np.array_equal(shown, _pixels(direct.json()["data"][0]["b64_json"]))
    plain = http.post("/v1/images/edits", data={k: v for k, v in fields.items() if k != "loras"}, files=files)
    assert plain.status_code == 200, plain.text
    assert np.abs(shown - _pixels(plain.json()["data"][0]["b64_json"])).max() > 20
