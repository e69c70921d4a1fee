"""LoRA adapters through the served app: the official client's `extra_body={"loras": [...]}` on
generations, edits and streams, `GET /v1/loras`, the handle API, and bad names and files as 400s.

The adapter files are written into the running app's adapter directory (`loras/` under its cache
dir) by the tests themselves, while it serves: a file added then is usable without a restart.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
from deployments.local_pipeline import GenerationSpec
from serve_app.protocol import ImageRequest, LoraSpec
from tests.integration.conftest import APP_NAME, off_loop
from deployments.denoiser.lora.random_adapters import diffusers_state, kohya_state, random_factors, write

pytestmark = pytest.mark.integration

STEPS, SEED = 2, 4242


@pytest.fixture(scope="module")
def lora_dir(served, cache_dir, pipeline):
    directory = cache_dir / "loras"
    transformer = pipeline.loop.transformer
    write(directory, "watercolor", diffusers_state(random_factors(transformer, rank=4, seed=7)))
    write(directory, "ink", kohya_state(random_factors(transformer, rank=8, seed=8), alpha=4.0))
    misfit = diffusers_state(random_factors(transformer, rank=4, seed=9))
    key = "transformer.layers.1.feed_forward.w2.lora_A.weight"
    misfit[key] = misfit[key][:, :-1].contiguous()
    write(directory, "misfit", misfit)
    return directory


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", timeout=300, max_retries=0) as c:
        yield c


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def test_listing_shows_files_added_while_serving(http, lora_dir):
    data = {entry["name"]: entry for entry in http.get("/v1/loras").json()["data"]}
    assert {"watercolor", "ink", "misfit"} <= set(data)
    assert data["ink"]["rank"] == 8 and data["watercolor"]["rank"] == 4
    assert "feed_forward.w2" in data["ink"]["target_modules"]
    assert data["ink"]["bytes"] == (lora_dir / "ink.safetensors").stat().st_size


def test_the_official_client_applies_two_adapters_as_the_local_pipeline(client, lora_dir, pipeline):
    loras = [{"name": "watercolor", "scale": 0.8}, {"name": "ink", "scale": -1.1}]
    result = client.images.generate(prompt="a lighthouse at dusk", size="512x512",
                                     extra_body={"seed": SEED, "num_inference_steps": STEPS, "loras": loras})
    assert result.data[0].model_extra["loras"] == loras
    plain = client.images.generate(prompt="a lighthouse at dusk", size="512x512",
                                   extra_body={"seed": SEED, "num_inference_steps": STEPS})
    assert "loras" not in plain.data[0].model_extra  # no unknown `null` field for strict clients
    library = LoraLibrary(LoraSettings(lora_dir=str(lora_dir)))
    slots = pipeline.loop.lora_slots
    adapters = tuple((slots.lay_out(library.load(item["name"])[0]), item["scale"]) for item in loras)
    local = pipeline.generate([GenerationSpec("a lighthouse at dusk", 512, 512, steps=STEPS, seed=SEED,
                                              loras=adapters)])[0].pixels.numpy().astype(np.int16)
    ours = pixels(result.data[0].b64_json)
    assert np.abs(ours - local).max() <= 1
    assert np.abs(ours - pixels(plain.data[0].b64_json)).max() > 20


def test_a_stream_and_an_edit_take_adapters(client, lora_dir):
    loras = [{"name": "ink", "scale": 0.5}]
    body = {"seed": SEED, "num_inference_steps": STEPS, "loras": loras}
    whole = client.images.generate(prompt="a koi pond", size="512x512", extra_body=body)
    events = list(client.images.generate(prompt="a koi pond", size="512x512", stream=True, partial_images=1,
                                         extra_body=body))
    completed = events[-1]
    assert completed.type == "image_generation.completed" and completed.model_extra["loras"] == loras
    assert np.array_equal(pixels(completed.b64_json), pixels(whole.data[0].b64_json))
    plain = list(client.images.generate(prompt="a koi pond", size="512x512", stream=True,
                                        extra_body={"seed": SEED, "num_inference_steps": STEPS}))[-1]
    assert plain.type == "image_generation.completed" and "loras" not in plain.model_extra
    upload = io.BytesIO()
    Image.fromarray(pixels(whole.data[0].b64_json).astype(np.uint8)).save(upload, format="PNG")
    edits = [client.images.edit(image=("in.png", upload.getvalue(), "image/png"), prompt="a koi pond in snow",
                                extra_body={"seed": 1, "num_inference_steps": STEPS, "strength": 0.8, **extra})
             for extra in ({"loras": [{"name": "watercolor", "scale": 1.5}]}, {})]
    assert edits[0].data[0].model_extra["loras"] == [{"name": "watercolor", "scale": 1.5}]
    assert "loras" not in edits[1].data[0].model_extra
    assert np.abs(pixels(edits[0].data[0].b64_json) - pixels(edits[1].data[0].b64_json)).max() > 20


def test_the_handle_api_takes_adapters(served, client, lora_dir):
    from ray import serve

    request = ImageRequest(prompt="a teapot", width=512, height=512, steps=STEPS, seed=3,
                           loras=(LoraSpec(name="watercolor", scale=0.6),))
    result = off_loop(lambda: serve.get_app_handle(APP_NAME).generate.remote(request).result(timeout_s=300))
    assert result.images[0].loras == (LoraSpec(name="watercolor", scale=0.6),)
    over_http = client.images.generate(prompt="a teapot", size="512x512", extra_body={
        "seed": 3, "num_inference_steps": STEPS, "loras": [{"name": "watercolor", "scale": 0.6}]})
    assert result.images[0].data == base64.b64decode(over_http.data[0].b64_json)


@pytest.mark.parametrize("loras, message", [
    ([{"name": "nope"}], "Unknown LoRA adapter 'nope'"),
    ([{"name": "../loras/ink"}], "Unknown LoRA adapter '../loras/ink'"),
    ([{"name": "ink", "scale": 2.5}], "less than or equal to 2"),
    ([{"name": n} for n in ("ink", "watercolor", "misfit", "a", "b")], "At most 4"),
    ([{"name": "ink"}, {"name": "ink"}], "once per request"),
    ([{"name": "misfit"}], "layers.1.feed_forward.w2.lora_A.weight"),
], ids=["unknown", "path", "scale", "count", "twice", "misfit"])
def test_bad_adapters_are_400s_naming_loras(client, lora_dir, loras, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a fox", size="512x512",
                               extra_body={"seed": 1, "num_inference_steps": 1, "loras": loras})
    error = info.value.body
    assert error["param"].startswith("loras") and message in error["message"]
    if loras[0]["name"] == "misfit":  # a file that fails in the Denoiser leaves it serving everyone else
        ok = client.images.generate(prompt="a fox", size="512x512",
                                    extra_body={"seed": 1, "num_inference_steps": 1, "loras": [{"name": "ink"}]})
        assert ok.data[0].model_extra["loras"] == [{"name": "ink", "scale": 1.0}]
