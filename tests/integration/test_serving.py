"""The Ray Serve application end to end: the graph, batching, handle calls and live reconfiguration."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time

import httpx
import numpy as np
import pytest

from tests.integration.conftest import APP_NAME, decode_png

pytestmark = pytest.mark.integration

SMALL = {"size": "512x512", "num_inference_steps": 3}


def generate(http: httpx.Client, **fields) -> dict:
    response = http.post("/v1/images/generations", json={"prompt": "a red fox in fresh snow", **SMALL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_request_through_the_whole_graph_returns_a_png(http):
    body = generate(http, seed=11, n=2, style="Watercolor")
    assert [item["seed"] for item in body["data"]] == [11, 12]
    for item in body["data"]:
        image = decode_png(item["b64_json"])
        assert image.size == (512, 512) and image.mode == "RGB"
        assert item["revised_prompt"].startswith("a red fox in fresh snow") and "watercolour" in item["revised_prompt"]
    assert body["random_weights"] is True
    assert body["timings"]["denoise_ms"] > 0 and body["timings"]["total_ms"] >= body["timings"]["denoise_ms"] / 2
    # What ran, by stage: `auto` on a CPU resolves to float32 eager in every replica.
    assert body["speed"] == dict.fromkeys(("text_encoder", "denoiser", "vae"), "float32, eager on cpu")


def test_each_stage_reports_its_resolved_speed_settings_and_its_start(served):
    for stage, keys in (("TextEncoder", {"dtype", "text_encoder_compile"}),
                        ("Denoiser", {"dtype", "precision", "fp8_kernels", "compile", "dit_cuda_graphs"}),
                        ("VaeDecoder", {"dtype", "vae_compile"})):
        stats = served.stats(stage)
        speed = stats["speed"]
        assert speed["device"] == "cpu" and set(speed) == keys | {"device"}, speed
        assert speed["dtype"] == {"value": "float32", "reason": "the CPU runs float32"}
        assert all(speed[k]["value"] is False for k in keys if k.endswith("compile") or k.endswith("graphs"))
        assert stats["state"] == "ready" and stats["warm_after_ready"]["ready"]
        assert stats["start_phases"]["ready_s"] > 0
    assert served.stats("Denoiser")["speed"]["precision"]["value"] == "float32"


def test_concurrent_requests_are_batched_in_every_gpu_stage_and_match_the_image_made_alone(served, http):
    prompts = [f"prompt number {i}: " + "a lighthouse " * (i + 1) for i in range(8)]
    served.reset_stats()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        bodies = list(pool.map(lambda i: generate(http, prompt=prompts[i], seed=100 + i), range(8)))
    for stage, method in (("TextEncoder", "encode"), ("Denoiser", "step"), ("VaeDecoder", "decode")):
        sizes = served.stats(stage)["methods"][method]["batch_sizes"]
        assert max(sizes) > 1, f"{stage} never ran a batch larger than 1: {sizes}"
    assert served.stats("Denoiser")["batch_invariant"] is True  # the CPU default
    for i, body in enumerate(bodies):  # batch invariance on the CPU: the very same pixels
        alone = generate(http, prompt=prompts[i], seed=100 + i)
        together_px = np.asarray(decode_png(body["data"][0]["b64_json"]))
        alone_px = np.asarray(decode_png(alone["data"][0]["b64_json"]))
        assert np.array_equal(together_px, alone_px), f"request {i} differs alone and in a batch"


def test_a_second_serve_application_calls_the_app_through_a_handle(served):
    from ray import cloudpickle, serve

    import tests.integration.handle_client as client_module

    cloudpickle.register_pickle_by_value(client_module)
    serve.run(client_module.HandleClient.bind(APP_NAME), name="handle-client", route_prefix="/handle-client")
    try:
        summary = serve.get_app_handle("handle-client").remote("a koi pond", 2).result(timeout_s=120)
    finally:
        serve.delete("handle-client")
    assert summary["count"] == 2
    assert summary["seeds"] == [7, 8]
    assert summary["formats"] == ["png", "png"]
    assert summary["sizes"] == [[512, 512], [512, 512]]
    assert all(head == list(b"\x89PNG") for head in summary["heads"])


def test_user_config_changes_the_batch_size_without_a_restart(served, http):
    before = served.stats("Denoiser")
    try:
        served.deploy([{"name": "Denoiser", "user_config": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}])
        after = served.stats("Denoiser")
        assert after["config"]["max_batch_size"] == 1
        assert after["load_seconds"] == before["load_seconds"] and after["pid"] == before["pid"]
        served.reset_stats()
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda i: generate(http, seed=i), range(4)))
        assert set(served.stats("Denoiser")["methods"]["step"]["batch_sizes"]) == {1}
    finally:
        served.deploy()
    assert served.stats("Denoiser")["config"]["max_batch_size"] == 8


def _image_steps(stats: dict) -> int:
    return stats["methods"].get("step", {}).get("items", 0)


def test_a_client_that_disconnects_has_its_job_dropped_at_the_next_step(served):
    """A closed HTTP connection cancels the request through Serve, down to the Denoiser, which drops
    the job at the next step boundary instead of finishing its 16 steps (and its decode)."""
    before = served.stats("Denoiser")
    assert before["scheduling"] == "continuous"
    body = {"prompt": "a lighthouse in a storm", "size": "1024x1024", "num_inference_steps": 16}

    async def disconnect_once_denoising() -> None:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            request = asyncio.create_task(client.post("/v1/images/generations", json=body))
            deadline = time.monotonic() + 60
            while _image_steps(await asyncio.to_thread(served.stats, "Denoiser")) == _image_steps(before):
                assert not request.done(), "the request finished before it could be cancelled"
                assert time.monotonic() < deadline, "the job never reached the Denoiser"
                await asyncio.sleep(0.05)
            request.cancel()  # closes the connection mid-request
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(disconnect_once_denoising())
    deadline = time.monotonic() + 30
    while (after := served.stats("Denoiser"))["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the Denoiser never dropped the cancelled job"
        time.sleep(0.2)
    time.sleep(1.0)  # had the job gone on, it would step on meanwhile
    assert _image_steps(served.stats("Denoiser")) - _image_steps(before) < 16
