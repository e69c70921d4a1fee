"""The serving side of LoRA adapters without Ray: the replica's adapter cache, the Ingress's checks,
multipart fields, and how errors reach the client."""

from __future__ import annotations

import pytest
import torch

from deployments.contracts import LoraRef
from deployments.denoiser.lora.cache import AdapterCache
from deployments.denoiser.lora.errors import LoraFitError, LoraUnsupportedError
from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
from deployments.denoiser.lora.slots import install_lora
from deployments.weights import loading
from serve_app.config import ApiLimits
from serve_app.errors import ApiError, api_error_for
from serve_app.loras import LoraCatalog, form_loras
from serve_app.pipeline import plan_request
from serve_app.protocol import ImageGenerationRequest, LoraSpec
from deployments.denoiser.lora.random_adapters import diffusers_state, random_factors, write


@pytest.fixture(autouse=True)
def _metrics_off(monkeypatch):
    monkeypatch.setenv("ZIMAGE_METRICS", "0")


@pytest.fixture(scope="module")
def transformer(tiny_source):
    return loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)


@pytest.fixture()
def directory(tmp_path, transformer):
    for seed, name in enumerate(("one", "two", "three")):
        write(tmp_path, name, diffusers_state(random_factors(transformer, rank=4, seed=seed)))
    return tmp_path


def test_cache_hits_misses_and_evicts_least_recently_used(directory, transformer):
    slots = install_lora(transformer)
    cache = AdapterCache(LoraLibrary(LoraSettings(lora_dir=str(directory))), slots, capacity_bytes=0)
    (one, scale), = cache.resolve([LoraRef("one", 0.5)])
    assert scale == 0.5 and one.name == "one" and cache.counts.misses == 1
    size = one.nbytes
    cache.capacity_bytes = 2 * size
    assert cache.resolve([LoraRef("one")])[0][0] is one and cache.counts.hits == 1
    cache.resolve([LoraRef("two")])
    cache.resolve([LoraRef("one")])  # "two" is now the least recently used
    cache.resolve([LoraRef("three")])
    assert cache.resident_names() == ["one", "three"] and cache.counts.evictions == 1
    assert cache.counts.resident_bytes == 2 * size and cache.counts.loads == 3
    cache.capacity_bytes = 0  # the adapters of the request at hand stay, whatever the capacity
    both = cache.resolve([LoraRef("two"), LoraRef("three")])
    assert [a.name for a, _ in both] == ["two", "three"] and cache.resident_names() == ["two", "three"]


def test_cache_refuses_a_replica_without_adapter_support_and_files_that_do_not_fit(directory, transformer):
    library = LoraLibrary(LoraSettings(lora_dir=str(directory)))
    with pytest.raises(LoraUnsupportedError, match="without adapter support"):
        AdapterCache(library, None, 1 << 30).resolve([LoraRef("one")])
    factors = random_factors(transformer, rank=4, seed=5)
    a, b = factors["layers.0.attention.to_out.0"]
    factors["layers.0.attention.to_out.0"] = (a, b[:-2])
    write(directory, "bad", diffusers_state(factors))
    with pytest.raises(LoraFitError) as info:
        AdapterCache(library, install_lora(transformer), 1 << 30).resolve([LoraRef("bad")])
    error = api_error_for(info.value)
    assert (error.status, error.param) == (400, "loras") and "layers.0.attention.to_out.0.lora_A" in error.message


def test_eviction_between_steps_leaves_running_jobs_their_factors(directory, transformer, tiny_source):
    """Running jobs hold their adapters: with the cache at capacity 0, each step is followed by a request
    for another adapter, which evicts theirs; they finish with the latents of an undisturbed run."""
    from deployments.contracts import DenoiseJob
    from deployments.denoiser.loop import DenoiseLoop

    loop = DenoiseLoop(transformer, loading.load_scheduler(tiny_source), torch.device("cpu"), torch.float32,
                       batch_invariant=False)
    cache = AdapterCache(LoraLibrary(LoraSettings(lora_dir=str(directory))), loop.lora_slots, capacity_bytes=0)

    def job(name: str, seed: int) -> DenoiseJob:
        caption = torch.randn(12, transformer.config.cap_feat_dim, generator=torch.Generator().manual_seed(seed))
        refs = (LoraRef(name, 0.8),)
        return DenoiseJob(caption=caption, width=256, height=256, steps=3, seed=seed, adapters=cache.resolve(refs),
                          loras=refs)

    with torch.inference_mode():
        undisturbed = loop.run([job("one", 1), job("two", 2)])
        states = [loop.start(job("one", 1)), loop.start(job("two", 2))]
        evictions = cache.counts.evictions
        while not all(state.done for state in states):
            loop.step(states)
            cache.resolve([LoraRef("three")])  # evicts "one" and "two", whose jobs are still running
    assert cache.counts.evictions > evictions and "one" not in cache.resident_names()
    for state, expected in zip(states, undisturbed):
        assert torch.equal(state.result().latents, expected.latents)


def test_the_step_loop_keeps_stepping_while_an_adapter_loads(directory, cache_dir, monkeypatch):
    """The Denoiser reads, converts and lays out a request's adapters in a worker thread
    (`AdapterCache.resolve_async`), so a slow read holds up no one else's steps: while the read of
    "one" is stuck, the running job keeps stepping. The read waits until the event loop has seen two
    steps taken after it began (at most 10 s); were the read on the event loop's thread, no step could
    be taken meanwhile and the read would give up waiting. Then the request with the adapter runs."""
    import asyncio
    import threading

    from deployments.contracts import CaptionEmbedding, DenoiseRequest
    from deployments.denoiser.deployment import Denoiser

    settings = {"model": "tiny", "device": "cpu", "cache_dir": str(cache_dir), "lora_dir": str(directory)}
    denoiser = Denoiser.func_or_class(settings)
    steps: list[int] = []  # images per step, on the model thread as each step ends
    loop_step = denoiser.loop.step
    monkeypatch.setattr(denoiser.loop, "step", lambda states: (loop_step(states), steps.append(len(states)))[0])
    reading, released = threading.Event(), threading.Event()
    during: list = []  # steps taken when the read began, whether it was released, steps taken when it went on
    read = denoiser.lora_library.load

    def slow_read(name):
        during.append(len(steps))
        reading.set()
        during.append(released.wait(timeout=10.0))  # released at once where steps go on: a bound for slow machines
        during.append(len(steps))
        return read(name)

    monkeypatch.setattr(denoiser.lora_library, "load", slow_read)
    embedding = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    caption = CaptionEmbedding(embedding, num_tokens=12, truncated=False)

    async def scenario():
        try:
            running = asyncio.create_task(denoiser.denoise(DenoiseRequest(128, 128, steps=40, seed=0), caption))
            while not steps:  # the job is under way
                await asyncio.sleep(0.002)
            adapted = asyncio.create_task(denoiser.denoise(
                DenoiseRequest(128, 128, steps=2, seed=1, loras=(LoraRef("one", 0.5),)), caption))
            while not reading.is_set():
                await asyncio.sleep(0.002)
            while len(steps) < during[0] + 2 and not running.done():
                await asyncio.sleep(0.002)
            released.set()
            return await asyncio.gather(running, adapted)
        finally:
            await denoiser.aclose()

    long_job, with_adapter = asyncio.run(scenario())
    begun, was_released, ended = during
    assert was_released and ended >= begun + 2, during  # steps went on while the read was stuck
    assert (long_job.steps_run, with_adapter.steps_run) == (40, 2)
    assert denoiser.lora_cache.counts.loads == 1 and denoiser.lora_cache.resident_names() == ["one"]


def test_evictions_on_the_loading_thread_never_fail_a_step_planning_its_factors(transformer):
    """An eviction drops the slots' cached plans (`LoraSlots.forget`, called by `AdapterCache._evict` on
    the thread that loads adapters) while the model thread plans each step's factors (`LoraSlots.plan`,
    in `using`): no interleaving of the two may fail the step. For half a second, with the interpreter
    switching threads as often as it can, one thread forgets while this one plans."""
    import sys
    import threading
    import time

    from deployments.denoiser.lora.adapter import LoraAdapter

    slots = install_lora(transformer)
    one, two = (slots.lay_out(LoraAdapter(name, random_factors(transformer, rank=4, seed=seed)))
                for seed, name in enumerate(("one", "two")))
    mixes = [[((one, 1.0),)], [((two, 0.5),)], [((one, 1.0),), ((two, 1.0),)]]
    stop = threading.Event()

    def evicting():
        while not stop.is_set():
            slots.forget()
            time.sleep(0.0002)

    failures = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    evictions = threading.Thread(target=evicting)
    evictions.start()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for rows in mixes:
                try:
                    slots.plan(rows)
                except Exception as exc:  # noqa: BLE001 - counted: any is a failed step
                    failures.append(exc)
    finally:
        stop.set()
        evictions.join()
        sys.setswitchinterval(switch)
    assert not failures, f"{len(failures)} plans failed, e.g. {failures[0]!r}"


def test_the_ingress_checks_names_and_counts(directory):
    catalog = LoraCatalog({"lora_dir": str(directory)})
    limits = ApiLimits(max_loras_per_request=2)

    def plan(*loras):
        return plan_request(ImageGenerationRequest(prompt="a fox", loras=list(loras)), None, limits, "tiny")

    catalog.check(plan({"name": "one"}, {"name": "two", "scale": -2}).loras)
    with pytest.raises(ApiError, match="Unknown LoRA adapter 'four'") as info:
        catalog.check(plan({"name": "four"}).loras)
    assert (info.value.status, info.value.param, info.value.code) == (400, "loras", "lora_not_found")
    with pytest.raises(ApiError, match="At most 2"):
        plan({"name": "one"}, {"name": "two"}, {"name": "three"})
    (directory / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ApiError, match="cannot be used"):
        catalog.check(plan({"name": "broken"}).loras)


@pytest.mark.parametrize("items, expected", [
    ([("loras[][name]", "a"), ("loras[][name]", "b"), ("loras[][scale]", "0.5"), ("loras[][scale]", "-1")],
     [{"name": "a", "scale": "0.5"}, {"name": "b", "scale": "-1"}]),
    ([("loras[][name]", "a")], [{"name": "a"}]),
    ([("loras[1][name]", "b"), ("loras[0][name]", "a"), ("loras[0][scale]", "0.3")],
     [{"name": "a", "scale": "0.3"}, {"name": "b"}]),
    ([("loras", '[{"name": "a", "scale": 1.5}]')], [{"name": "a", "scale": 1.5}]),
])
def test_multipart_loras_fields(items, expected):
    assert form_loras(items) == expected


@pytest.mark.parametrize("items", [
    [("loras[][name]", "a"), ("loras[][name]", "b"), ("loras[][scale]", "0.5")],
    [("loras", "not json")],
    [("loras[][path]", "/etc")],
])
def test_multipart_loras_problems_are_400s(items):
    with pytest.raises(ApiError) as info:
        form_loras(items)
    assert (info.value.status, info.value.param) == (400, "loras")


def test_the_multiplexed_model_id_is_the_sorted_adapter_set():
    from deployments.denoiser.lora.library import adapter_set_id

    assert adapter_set_id(["ink", "watercolor"]) == adapter_set_id(["watercolor", "ink"]) == "ink+watercolor"
    assert adapter_set_id(["ink"]) == "ink"


def test_the_access_log_names_the_adapters():
    from serve_app.access_log import AccessRecord

    plan = plan_request(ImageGenerationRequest(prompt="a fox", loras=[{"name": "ink", "scale": 0.5}, {"name": "w"}]),
                        None, ApiLimits(), "tiny")
    record = AccessRecord("/v1/images/generations")
    record.describe(plan)
    assert record.fields()["loras"] == "ink:0.5,w:1"


@pytest.mark.parametrize("loras", [(), (LoraSpec(name="ink", scale=0.5),)], ids=["none", "one"])
@pytest.mark.parametrize("url", [None, "https://images.example/a.png"], ids=["b64", "url"])
def test_an_image_made_without_adapters_has_no_loras_field_on_the_wire(loras, url):
    """Strict OpenAI clients see no unknown `loras: null`: the field is left out of the response's
    image and of the completed stream event unless adapters were used; the handle API keeps `()`."""
    import asyncio
    import json

    from serve_app.protocol import GeneratedImage, ImageResult, Timings
    from serve_app.responses import images_response
    from serve_app.streaming import StreamEvents

    image = GeneratedImage(data=b"" if url else b"\x89PNG", format="png", seed=3, width=512, height=512,
                           revised_prompt="a fox", loras=loras, url=url)
    result = ImageResult(images=[image], timings=Timings(total_ms=1, style_ms=0, encode_ms=0, denoise_ms=1,
                                                         decode_ms=0, output_encode_ms=0))
    assert result.images[0].loras == loras
    item = json.loads(asyncio.run(images_response(result, "tiny")).body)["data"][0]
    plan = plan_request(ImageGenerationRequest(prompt="a fox", stream=True), None, ApiLimits(), "tiny")
    event = StreamEvents("image_generation", ImageGenerationRequest(prompt="a fox", stream=True), plan).encode(result)
    completed = json.loads(event.decode().split("data: ", 1)[1])
    assert completed["type"] == "image_generation.completed" and ("url" in completed) == bool(url)
    for body in (item, completed):
        assert body["seed"] == 3 and body.get("b64_json", body.get("url"))
        if loras:
            assert body["loras"] == [{"name": "ink", "scale": 0.5}]
        else:
            assert "loras" not in body and None not in body.values()
