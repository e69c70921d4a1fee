"""The load generator's control images (`--control-fraction`): which requests carry one, what they
send, how the report tells them apart, and bench_serve's controlled loads; over real HTTP against small
fake servers (tests/integration/test_controlnet.py sends such a load to the real app)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from benchmarks.loadgen import main, parse_size_mix
from benchmarks.loadgen.control import default_control_image, load_control_image
from serve_app.control import canny
from tests.unit.test_loadgen import PROMPTS, config, png_b64, with_fake_server


def bodies(count: int = 4000, **overrides) -> list[dict]:
    from benchmarks.loadgen.client import _Runner

    options = {"control_image": b"\x89PNG not read here", **overrides}
    runner = _Runner(config("http://unused", size_mix=parse_size_mix("1024x1024,512x512"), **options), None)
    return [runner.request_body(i)[0] for i in range(count)]


CONTROL_FIELDS = ("control_image", "control_scale", "control_preprocess")


def test_a_share_of_requests_carries_the_control_image_and_keeps_the_plain_runs_bodies():
    """Half the requests (4000 drawn) carry the image, scale and preprocessing; their prompts, sizes
    and seeds, and every other request, are the run's without control; the same seed picks the same."""
    plain, half = bodies(), bodies(control_fraction=0.5, control_scale=0.6)
    controlled = [b for b in half if "control_image" in b]
    assert abs(len(controlled) - 2000) < 120
    assert [{k: v for k, v in b.items() if k not in CONTROL_FIELDS} for b in half] == plain
    assert all((b["control_image"], b["control_scale"], b["control_preprocess"])
               == (base64.b64encode(b"\x89PNG not read here").decode(), 0.6, "canny") for b in controlled)
    assert not any(field in b for b in plain for field in CONTROL_FIELDS)
    assert half == bodies(control_fraction=0.5, control_scale=0.6)
    assert [("control_image" in b) for b in half] != [("control_image" in b) for b in bodies(
        control_fraction=0.5, control_scale=0.6, shuffle_seed=1)]
    assert all("control_image" in b for b in bodies(100, control_fraction=1.0))
    as_sent = bodies(100, control_fraction=1.0, control_preprocess=None)
    assert all("control_preprocess" not in b for b in as_sent)


@pytest.mark.parametrize("overrides", [{"control_fraction": -0.1}, {"control_fraction": 1.5},
                                       {"control_scale": 2.5}, {"control_preprocess": "depth"}])
def test_bad_control_options_are_refused(overrides):
    with pytest.raises(ValueError):
        config("http://unused", **overrides).validate()


def test_the_default_control_image_is_a_photo_with_edges():
    """A 1024x1024 JPEG the size of a camera photo, the same bytes each time, whose edge map (the
    server's canny) has edges along its shapes and not in its noise."""
    data = default_control_image()
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("JPEG", (1024, 1024)) and 50_000 < len(data) < 400_000
    assert data == default_control_image()
    from benchmarks.loadgen.control import SHAPES

    edges = np.asarray(canny(image.convert("RGB")).convert("L")) > 127
    for (left, top, right, bottom), _ in SHAPES:  # each shape's top and left borders, within 2 px
        assert edges[top - 2 : top + 3, left + 8 : right - 8].any(axis=0).mean() > 0.9
        assert edges[top + 8 : bottom - 8, left - 2 : left + 3].any(axis=1).mean() > 0.9
    assert not edges[700:760, 40:80].any()  # the gradient with its noise: no edges


def test_the_cli_sends_control_images_and_reports_them_apart(tmp_path, capsys):
    sent: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        sent.append(body)
        await asyncio.sleep(0.02 if "control_image" in body else 0.0)
        return web.json_response({"created": 1, "data": [{"b64_json": png_b64()}]})

    control = tmp_path / "edges.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(control)
    out = tmp_path / "control.json"
    argv = ["--concurrency", "3", "--requests", "40", "--control-fraction", "0.5", "--control-image", str(control),
            "--control-preprocess", "none", "--json", str(out), "--no-progress"]
    code = asyncio.run(with_fake_server(handler, lambda url: asyncio.to_thread(main, ["--url", url, *argv])))
    assert code == 0 and len(sent) == 40
    with_image = [b for b in sent if "control_image" in b]
    assert 8 <= len(with_image) <= 32 and all("control_preprocess" not in b for b in with_image)
    assert {base64.b64decode(b["control_image"]) for b in with_image} == {control.read_bytes()}
    table = capsys.readouterr().out
    assert "a control image in 50% of requests (scale 0.75)" in table and "control" in table
    report = json.loads(out.read_text())
    by_control = report["latency_by_control"]
    assert by_control["control"]["count"] == len(with_image) and by_control["plain"]["count"] == 40 - len(with_image)
    assert by_control["control"]["p50_ms"] > by_control["plain"]["p50_ms"]  # the slower replies are theirs
    assert report["config"]["control_image"] == f"{control.stat().st_size} bytes"  # not the image itself
    assert sum(r["control"] for r in report["records"]) == len(with_image)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a PNG, JPEG or WebP"):
        load_control_image(tmp_path / "text.png")


def test_bench_serve_gives_the_app_a_controlnet_and_runs_the_controlled_load():
    from benchmarks import bench_serve

    def app_args(model: str, *sets: str) -> dict:
        args = argparse.Namespace(config="serve_config.yaml", model=model, device="cpu", set=list(sets),
                                  one_gpu=False, port=1, control_fraction=0.5)
        return bench_serve.app_config(args)["applications"][0]["args"]

    assert app_args("tiny")["controlnet"] == "tiny" and app_args("random")["controlnet"] == "random"
    assert app_args("random", "controlnet=/models/union-2.1.safetensors")["controlnet"] == "/models/union-2.1.safetensors"
    with pytest.raises(SystemExit, match="needs a ControlNet"):
        app_args("Tongyi-MAI/Z-Image-Turbo")

    sent: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return web.json_response({"created": 1, "data": [{"b64_json": png_b64()}]})

    options = bench_serve.control_options(argparse.Namespace(control_fraction=1.0, control_image=None,
                                                             control_preprocess="canny"))
    report = asyncio.run(with_fake_server(handler, lambda url: asyncio.to_thread(
        bench_serve.load, url, "control", "512x512", 2, 1, PROMPTS, requests=4, fresh_prompts=True, **options)))
    assert report["ok"] == 4 and report["config"]["control_fraction"] == 1.0
    assert all(base64.b64decode(b["control_image"]) == default_control_image() and b["control_preprocess"] == "canny"
               for b in sent)
    summary = bench_serve.summarize({"load/continuous/512/control": {**report, "throughput_vs_plain": 0.8}})
    assert "0.800x the throughput without control" in summary


def test_bench_serve_judges_the_controlled_1024_load_and_never_calls_a_missing_figure_met(capsys):
    from benchmarks import bench_serve

    data = {"load/continuous/512/control": {"throughput_vs_plain": 0.5},  # not the target's load
            "load/continuous/1024/control": {"throughput_vs_plain": 0.8},
            "load/batch/1024/control": {"throughput_vs_plain": 0.7}}
    verdict = bench_serve.control_targets(data)["served_throughput_ratio"]
    assert verdict == {"value": 0.7, "target": ">= 0.75", "met": False}  # the worst policy counts
    del data["load/batch/1024/control"]
    assert bench_serve.control_targets(data)["served_throughput_ratio"]["met"] is True
    missing = bench_serve.control_targets({"load/continuous/512/control": {"throughput_vs_plain": 0.9}})
    assert missing["served_throughput_ratio"] == {"value": None, "target": ">= 0.75", "met": None}
    assert "not measured" in capsys.readouterr().out.splitlines()[-1]
