"""The load generator against real HTTP: the baseline server on the tiny model, and small fake servers.

Everything runs on the CPU in well under a minute; the baseline server is a subprocess that is
always stopped, whatever the test's outcome.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from benchmarks.loadgen import (
    LatencyStats,
    LoadConfig,
    LoadReport,
    RequestRecord,
    check_response,
    goodput,
    main,
    parse_size_mix,
    percentile,
    run_load,
)

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red bicycle", "fog over pine hills", "un gato naranja", "一只熊猫"]
SERVER_START_TIMEOUT_S = 120



def images_and_problem(body: bytes, expected: int) -> tuple[int, str | None]:
    return check_response(body, expected)[:2]

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_b64(size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def config(url: str, **overrides) -> LoadConfig:
    values = dict(url=url, concurrency=2, requests=6, prompts=PROMPTS, timeout_s=30.0)
    values.update(overrides)
    return LoadConfig(**values)


# ------------------------------------------------------------------------------------- pure logic


def test_percentile_matches_linear_interpolation():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of input does not matter
    assert percentile([10.0, 40.0], 25) == pytest.approx(17.5)  # between ranks, not the nearest one
    stats = LatencyStats.of([40.0, 10.0, 30.0, 20.0])
    assert stats.count == 4 and stats.mean_ms == 25.0 and stats.max_ms == 40.0 and stats.min_ms == 10.0
    assert (stats.p50_ms, stats.p90_ms, stats.p99_ms) == pytest.approx((25.0, 37.0, 39.7))


def test_goodput_counts_only_successes_within_the_slo():
    def rec(latency_ms: float, ok: bool, images: int) -> RequestRecord:
        return RequestRecord(0, 0.0, latency_ms, "512x512", images, None, 200 if ok else 500, ok, images if ok else 0)

    records = [rec(100, True, 2), rec(900, True, 2), rec(300, False, 2), rec(400, True, 1)]
    assert goodput(records, wall_s=2.0, slo_ms=500) == pytest.approx((2 + 1) / 2.0)
    assert goodput(records, wall_s=2.0, slo_ms=None) == pytest.approx((2 + 2 + 1) / 2.0)
    assert goodput(records, wall_s=0.0, slo_ms=500) == 0.0


def test_size_mix_parsing():
    mix = parse_size_mix("1024x1024:0.7, 512x512:0.3")
    assert [(s.width, s.height) for s in mix] == [(1024, 1024), (512, 512)]
    assert [s.weight for s in mix] == pytest.approx([0.7, 0.3])
    mix = parse_size_mix("1344x768:3,768x1344")  # weights are relative; a bare size weighs 1
    assert [s.size for s in mix] == ["1344x768", "768x1344"]
    assert [s.weight for s in mix] == pytest.approx([0.75, 0.25])
    for bad in ["", "1024", "1024x", "axb:1", "512x512:-1", "512x512:0", "512x512:x", "0x512", "512x512,512x512"]:
        with pytest.raises(ValueError):
            parse_size_mix(bad)


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(concurrency=2, rate=1.0, requests=1, prompts=PROMPTS).validate()
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(requests=1, prompts=PROMPTS).validate()
    with pytest.raises(ValueError, match="when to stop"):
        LoadConfig(concurrency=2, prompts=PROMPTS).validate()
    LoadConfig(rate=2.0, duration_s=1.0, prompts=PROMPTS).validate()


def test_response_checking():
    good = json.dumps({"created": 1, "data": [{"b64_json": png_b64()}, {"b64_json": png_b64()}]}).encode()
    assert images_and_problem(good, 2) == (2, None)
    assert images_and_problem(good, 3)[1] == "expected 3 images, got 2"
    not_image = json.dumps({"data": [{"b64_json": base64.b64encode(b"hello world").decode()}]}).encode()
    assert "not a PNG" in images_and_problem(not_image, 1)[1]
    assert "not valid base64" in images_and_problem(b'{"data": [{"b64_json": "!!!"}]}', 1)[1]
    assert "no b64_json" in images_and_problem(b'{"data": [{"url": "http://x"}]}', 1)[1]
    assert "no 'data'" in images_and_problem(b'{"created": 1}', 1)[1]
    assert "not JSON" in images_and_problem(b"<html>", 1)[1]
    webp = base64.b64encode(b"RIFF\x00\x00\x00\x00WEBPVP8 ").decode()
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0rest").decode()
    assert images_and_problem(json.dumps({"data": [{"b64_json": webp}, {"b64_json": jpeg}]}).encode(), 2) == (2, None)


def test_server_timings_are_read_when_present():
    data = [{"b64_json": png_b64()}]
    timings = {"total_ms": 812.5, "denoise_ms": 600, "note": "x", "cached": True, "nested": {"a": 1},
               "bad": float("nan"), "huge": 10**400}
    assert check_response(json.dumps({"data": data, "timings": timings}).encode(), 1) == (
        1, None, {"total_ms": 812.5, "denoise_ms": 600.0}  # finite numbers only, in the server's order
    )
    assert check_response(json.dumps({"data": data}).encode(), 1) == (1, None, None)  # a standard server
    assert check_response(json.dumps({"data": data, "timings": [1, 2]}).encode(), 1) == (1, None, None)
    assert check_response(json.dumps({"data": data, "timings": {"x": "y"}}).encode(), 1) == (1, None, None)
    assert check_response(b"<html>", 1)[2] is None
    assert check_response(json.dumps({"data": [], "timings": timings}).encode(), 1)[1] == "expected 1 images, got 0"


# -------------------------------------------------------------------------------- baseline server


@pytest.fixture(scope="module")
def baseline_url(cache_dir, tmp_path_factory) -> Iterator[str]:
    """The plain diffusers server on the tiny model, in a subprocess; killed at teardown."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("baseline") / "server.log"
    env = dict(os.environ, ZIMAGE_CACHE_DIR=os.environ.get("ZIMAGE_CACHE_DIR", str(cache_dir)))
    cmd = [
        sys.executable, "-m", "benchmarks.baseline_server", "--model", "tiny", "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"baseline server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"baseline server not healthy in {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_closed_loop_against_baseline(baseline_url, tmp_path):
    cfg = config(
        baseline_url, size_mix=parse_size_mix("512x512"), steps=2, warmup=1, slo_ms=60_000, seed_base=100, label="t"
    )
    report = asyncio.run(run_load(cfg))

    assert (report.sent, report.ok, report.failed) == (6, 6, 0), report.error_samples
    assert report.images == 6 and report.warmup_sent == 1 and report.warmup_ok == 1
    assert report.errors_by_status == {} and report.errors_by_exception == {}
    lat = report.latency
    assert lat.count == 6 and 0 < lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    assert set(report.latency_by_size) == {"512x512"}
    assert report.images_per_s > 0 and report.goodput_images_per_s == pytest.approx(report.images_per_s)
    measured = [r for r in report.records if not r.warmup]
    assert sorted(r.seed for r in measured) == list(range(101, 107))  # request i gets seed 100 + i

    out = tmp_path / "report.json"
    report.write_json(out)
    data = json.loads(out.read_text())
    assert data["ok"] == 6 and data["label"] == "t" and data["config"]["concurrency"] == 2
    assert len(data["records"]) == 7 and sum(r["warmup"] for r in data["records"]) == 1
    assert {"start_s", "latency_ms", "status", "size", "n"} <= set(data["records"][0])
    assert "p99" in report.format_table()
    assert report.server_timings_count == 0 and report.server_timings_p50_ms == {}  # the baseline sends no timings


def test_http_errors_are_counted_by_status(baseline_url):
    bad_size = asyncio.run(run_load(config(baseline_url, size_mix=parse_size_mix("100x100"), requests=3)))
    assert (bad_size.ok, bad_size.failed) == (0, 3)
    assert bad_size.errors_by_status == {"400": 3}
    assert "not supported" in bad_size.error_samples[0]  # the OpenAI error message comes through

    wrong_path = asyncio.run(run_load(config(baseline_url, path="/v1/nowhere", requests=2)))
    assert wrong_path.errors_by_status == {"404": 2} and wrong_path.errors_by_exception == {}

    refused = asyncio.run(run_load(config(f"http://127.0.0.1:{free_port()}", requests=2, timeout_s=5)))
    assert refused.failed == 2 and refused.errors_by_status == {}
    assert sum(refused.errors_by_exception.values()) == 2


# ----------------------------------------------------------------------------------- fake servers


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def with_fake_server(handler: Handler, body: Callable[[str], Awaitable[object]]) -> object:
    """Serves `handler` on a free port in this event loop while `body(url)` runs."""
    app = web.Application()
    app.router.add_post("/v1/images/generations", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_malformed_200_is_an_error():
    async def handler(request: web.Request) -> web.Response:
        payload = await request.json()
        timings = {"total_ms": 1.0}
        if payload["seed"] % 2:  # odd requests: a 200 that holds no image
            return web.json_response({"data": [{"b64_json": base64.b64encode(b"nope").decode()}], "timings": timings})
        return web.json_response({"data": [{"b64_json": png_b64(), "seed": payload["seed"]}], "timings": timings})

    report = asyncio.run(with_fake_server(handler, lambda url: run_load(config(url, requests=4))))
    assert isinstance(report, LoadReport)
    assert (report.ok, report.failed, report.images) == (2, 2, 2)
    assert report.server_timings_count == 2  # a malformed 200's timings are not counted
    assert report.errors_by_status == {"200": 2}
    assert report.error_samples[0].startswith("malformed 200")


def test_server_timings_are_summarised_over_measured_requests(tmp_path):
    """p50 of each `timings` field over measured successes, warm-up left out, plus the time outside the server."""

    async def handler(request: web.Request) -> web.Response:
        started = time.perf_counter()
        payload = await request.json()
        seed = payload["seed"]
        await asyncio.sleep(0.05)
        body: dict = {"created": 1, "data": [{"b64_json": png_b64()}]}
        if seed != 7:  # one measured response without timings, as from a server that sends none
            big = 1e6 if seed < 2 else 0.0  # the warm-up requests (seeds 0, 1) would move every median
            body["timings"] = {"total_ms": (time.perf_counter() - started) * 1000 + big, "denoise_ms": seed + big}
            if seed % 2 == 0:
                body["timings"]["image_encode_ms"] = 10.0 * seed  # a field only some responses carry
        return web.json_response(body)

    report = asyncio.run(  # measured seeds 2..7
        with_fake_server(handler, lambda url: run_load(config(url, requests=6, warmup=2, seed_base=0)))
    )
    assert isinstance(report, LoadReport)
    assert (report.ok, report.warmup_ok, report.server_timings_count) == (6, 2, 5)
    p50 = report.server_timings_p50_ms
    assert list(p50) == ["total_ms", "denoise_ms", "image_encode_ms"]  # the server's order
    assert p50["denoise_ms"] == 4.0 and p50["image_encode_ms"] == 40.0  # seeds 2..6; 2, 4, 6
    assert 50.0 <= p50["total_ms"] < report.latency.p50_ms
    assert 0.0 < report.outside_server_p50_ms < report.latency.p50_ms - 50.0
    by_seed = {r.seed: r.server_timings for r in report.records if not r.warmup}
    assert by_seed[7] is None and set(by_seed[3]) == {"total_ms", "denoise_ms"} and by_seed[3]["denoise_ms"] == 3.0

    table = report.format_table()
    assert "server timings, p50 over 5 requests" in table and "image_encode_ms" in table and "outside server" in table
    out = tmp_path / "report.json"
    report.write_json(out)
    data = json.loads(out.read_text())
    assert data["server_timings_count"] == 5 and data["server_timings_p50_ms"]["denoise_ms"] == 4.0
    assert data["outside_server_p50_ms"] == pytest.approx(report.outside_server_p50_ms)
    assert data["records"][0]["warmup"] and data["records"][0]["server_timings"]["denoise_ms"] >= 1e6


def test_open_loop_never_exceeds_the_in_flight_cap():
    state = {"now": 0, "max": 0, "auth": set()}

    async def handler(request: web.Request) -> web.Response:
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        state["auth"].add(request.headers.get("Authorization"))
        try:
            await asyncio.sleep(0.3)
            payload = await request.json()
            return web.json_response({"created": 1, "data": [{"b64_json": png_b64()} for _ in range(payload["n"])]})
        finally:
            state["now"] -= 1

    cfg_kwargs = dict(concurrency=None, rate=40.0, max_in_flight=3, requests=None, duration_s=1.0, n=2, api_key="k")

    async def body(url: str) -> LoadReport:
        return await run_load(config(url, **cfg_kwargs))

    started = time.perf_counter()
    report = asyncio.run(with_fake_server(handler, body))
    assert isinstance(report, LoadReport)
    assert time.perf_counter() - started < 1.0 + 30.0  # duration + timeout bounds the run
    assert state["max"] <= 3 and report.sent > 0 and report.dropped > 0
    assert report.failed == 0 and report.images == 2 * report.ok
    assert state["auth"] == {"Bearer k"}
    starts = [r.start_s for r in report.records]
    assert starts == sorted(starts) and all(0 <= s < 1.0 for s in starts)


def test_cli_writes_json(tmp_path, capsys):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"created": 1, "data": [{"b64_json": png_b64()}]})

    out = tmp_path / "cli.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    async def body(url: str) -> int:
        argv = [
            "--url", url, "--concurrency", "2", "--requests", "4", "--size-mix", "1024x1024:0.5,512x512:0.5",
            "--prompts", str(prompts), "--json", str(out), "--label", "cli", "--no-progress", "--slo-ms", "5000",
        ]
        return await asyncio.to_thread(main, argv)

    assert asyncio.run(with_fake_server(handler, body)) == 0
    data = json.loads(out.read_text())
    assert data["ok"] == 4 and data["label"] == "cli" and set(data["latency_by_size"]) <= {"1024x1024", "512x512"}
    # a server without `timings` (any OpenAI-compatible one): no breakdown, and null rather than NaN in the JSON
    assert data["server_timings_count"] == 0 and data["server_timings_p50_ms"] == {}
    assert data["outside_server_p50_ms"] is None
    printed = capsys.readouterr().out
    assert "images/s" in printed and "server timings" not in printed and "fresh prompts" not in printed


@pytest.mark.parametrize("how", [["-m", "benchmarks.loadgen"], ["benchmarks/loadgen"]])
def test_both_entry_points_start(how):
    result = subprocess.run([sys.executable, *how, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--concurrency" in result.stdout and "--size-mix" in result.stdout


def test_package_modules_and_re_exports():
    """Each module says its job, and the package re-exports what benchmarks/bench_serve.py imports."""
    import importlib

    from benchmarks import loadgen

    modules = {name: importlib.import_module(f"benchmarks.loadgen.{name}") for name in ("config", "client", "report", "cli")}
    assert all(module.__doc__ for module in modules.values())
    assert loadgen.LoadConfig is modules["config"].LoadConfig
    assert loadgen.load_prompts is modules["config"].load_prompts
    assert loadgen.parse_size_mix is modules["config"].parse_size_mix
    assert loadgen.run_load is modules["client"].run_load


# ---------------------------------------------------------------------------------- fresh prompts


def test_fresh_prompts_are_new_and_follow_the_sets_lengths():
    """4000 fresh prompts from the shipped set: all distinct, none of the set, their lengths in words
    (CJK characters) distributed as the set's, characters close to it too; the same seed the same prompts."""
    from collections import Counter

    from benchmarks.loadgen.config import DEFAULT_PROMPTS, load_prompts
    from benchmarks.loadgen.fresh import FreshPrompts, units

    prompts = load_prompts(DEFAULT_PROMPTS)
    fresh = [FreshPrompts(prompts, seed=3).prompt(i) for i in range(4000)]
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(prompts)
    assert fresh[:50] == [FreshPrompts(prompts, seed=3).prompt(i) for i in range(50)]
    assert fresh[:50] != [FreshPrompts(prompts, seed=4).prompt(i) for i in range(50)]

    def shares(lengths: list[int]) -> dict[int, float]:
        return {k: v / len(lengths) for k, v in Counter(lengths).items()}

    want, got = shares([len(units(p)) for p in prompts]), shares([len(units(p)) for p in fresh])
    total_variation = sum(abs(want.get(k, 0) - got.get(k, 0)) for k in set(want) | set(got)) / 2
    assert total_variation < 0.05, (want, got)
    assert max(len(units(p)) for p in fresh) == max(len(units(p)) for p in prompts)
    cjk = [p for p in fresh if "\u4e00" <= p[0] <= "\u9fff"]
    assert cjk and all(" " not in p for p in cjk)  # CJK prompts stay CJK, without spaces

    def quantiles(texts: list[str]) -> list[int]:
        lengths = sorted(len(t) for t in texts)
        return [lengths[int(q * (len(lengths) - 1))] for q in (0.1, 0.5, 0.9)]

    for set_chars, fresh_chars in zip(quantiles(prompts), quantiles(fresh)):
        assert abs(fresh_chars - set_chars) <= 0.2 * set_chars, (quantiles(prompts), quantiles(fresh))


def test_fresh_prompts_over_http_keep_the_sizes_and_seeds_of_the_repeating_set(tmp_path, capsys):
    """The same run with and without `--fresh-prompts`: the same sizes and seeds; the fresh run's
    prompts all new, the repeating run's all from the set; the report says which mode it ran."""
    sent: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return web.json_response({"created": 1, "data": [{"b64_json": png_b64()}]})

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["a lighthouse at dawn over a calm sea"]) + "\n", encoding="utf-8")

    def run(*extra: str) -> tuple[list[dict], dict]:
        sent.clear()
        out = tmp_path / f"run{len(extra)}.json"
        argv = ["--concurrency", "3", "--requests", "40", "--warmup", "2", "--size-mix", "1024x1024,512x512",
                "--prompts", str(prompts), "--json", str(out), "--no-progress", *extra]
        code = asyncio.run(with_fake_server(handler, lambda url: asyncio.to_thread(main, ["--url", url, *argv])))
        assert code == 0
        return sorted(sent, key=lambda b: b["seed"]), json.loads(out.read_text())

    repeating, repeating_report = run()
    assert "fresh prompts" not in capsys.readouterr().out
    fresh, fresh_report = run("--fresh-prompts")
    assert "fresh prompts" in capsys.readouterr().out
    assert len(fresh) == len(repeating) == 42
    assert [(b["seed"], b["size"]) for b in fresh] == [(b["seed"], b["size"]) for b in repeating]
    set_prompts = set(prompts.read_text(encoding="utf-8").splitlines())
    assert {b["prompt"] for b in repeating} <= set_prompts
    fresh_prompts = [b["prompt"] for b in fresh]
    assert len(set(fresh_prompts)) == 42 and not set(fresh_prompts) & set_prompts
    assert fresh_report["config"]["fresh_prompts"] is True and repeating_report["config"]["fresh_prompts"] is False


# ---------------------------------------------------------------------------------- LoRA adapters


def test_each_request_picks_one_adapter_uniformly_and_keeps_the_plain_runs_bodies():
    """`loras`: each request one adapter of the list, about equally often (4000 requests over 8), the
    same for the same seed and other for another; prompts, sizes and seeds are the adapter-free run's."""
    from collections import Counter

    from benchmarks.loadgen.client import _Runner

    names = [f"style{i}" for i in range(8)]

    def bodies(**overrides) -> list[dict]:
        runner = _Runner(config("http://unused", size_mix=parse_size_mix("1024x1024,512x512"), **overrides), None)
        return [runner.request_body(i)[0] for i in range(4000)]

    plain, picked = bodies(), bodies(loras=names, lora_scale=0.7)
    assert all(len(b["loras"]) == 1 and b["loras"][0]["scale"] == 0.7 for b in picked)
    assert [{k: v for k, v in b.items() if k != "loras"} for b in picked] == plain
    assert "loras" not in plain[0]
    counts = Counter(b["loras"][0]["name"] for b in picked)
    assert set(counts) == set(names) and all(abs(c - 500) < 100 for c in counts.values()), counts
    choice = [b["loras"][0]["name"] for b in picked]
    assert choice == [b["loras"][0]["name"] for b in bodies(loras=names, lora_scale=0.7)]
    assert choice != [b["loras"][0]["name"] for b in bodies(loras=names, shuffle_seed=1)]


@pytest.mark.parametrize("overrides", [{"loras": ["ink", "ink"]}, {"loras": [""]}, {"loras": ["ink"], "lora_scale": 2.5}])
def test_bad_adapter_options_are_refused(overrides):
    with pytest.raises(ValueError):
        config("http://unused", **overrides).validate()


def test_the_cli_sends_adapters_and_says_so(tmp_path, capsys):
    from benchmarks.loadgen import parse_loras

    sent: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return web.json_response({"created": 1, "data": [{"b64_json": png_b64()}]})

    out = tmp_path / "loras.json"
    argv = ["--concurrency", "3", "--requests", "24", "--loras", " ink, watercolor,pencil ", "--lora-scale", "-0.5",
            "--json", str(out), "--no-progress"]
    code = asyncio.run(with_fake_server(handler, lambda url: asyncio.to_thread(main, ["--url", url, *argv])))
    assert code == 0 and len(sent) == 24
    assert {b["loras"][0]["name"] for b in sent} == {"ink", "watercolor", "pencil"}
    assert all(b["loras"] == [{"name": b["loras"][0]["name"], "scale": -0.5}] for b in sent)
    assert "one of 3 LoRA adapters per request (scale -0.5)" in capsys.readouterr().out
    assert json.loads(out.read_text())["config"]["loras"] == ["ink", "watercolor", "pencil"]
    assert parse_loras("") == [] and parse_loras("a,,b") == ["a", "b"]
    with pytest.raises(ValueError):
        parse_loras("a,b,a")


def test_bench_serve_writes_random_adapters_and_runs_a_load_with_them(tmp_path, cache_dir, tiny_source):
    """bench_serve's `--lora-random`: adapter files the server's library reads (rank, targets), in a
    `lora_dir` set on the app; its load and its unseen-adapter probe send them."""
    import argparse

    from benchmarks import bench_serve
    from deployments.denoiser.lora.library import LoraLibrary, LoraSettings

    app = {"args": {"cache_dir": str(cache_dir)}}
    names = bench_serve.lora_names(argparse.Namespace(loras="", lora_random=2, lora_rank=4, model="tiny"), app)
    listed = {info.name: info for info in LoraLibrary(LoraSettings(lora_dir=app["args"]["lora_dir"])).list()}
    assert names == ["bench0", "bench1"] and set(listed) == set(names)
    assert all(info.rank == 4 and not info.error and "feed_forward.w2" in info.target_modules for info in listed.values())
    assert bench_serve.lora_names(argparse.Namespace(loras="a,b", lora_random=0), {"args": {}}) == ["a", "b"]

    sent: list[dict] = []

    async def handler(request: web.Request) -> web.Response:
        sent.append(await request.json())
        return web.json_response({"created": 1, "data": [{"b64_json": png_b64()}]})

    async def body(url: str):
        report = await asyncio.to_thread(bench_serve.load, url, "loras", "512x512", 2, 1, PROMPTS, requests=6,
                                         loras=names, lora_scale=0.5)
        first = await asyncio.to_thread(bench_serve.lora_first, url, names, "512x512", 1, PROMPTS[0], 0.5)
        return report, first

    report, first = asyncio.run(with_fake_server(handler, body))
    assert report["ok"] == 6 and report["config"]["loras"] == names
    assert {b["loras"][0]["name"] for b in sent[:6]} <= set(names) and all(b["loras"][0]["scale"] == 0.5 for b in sent)
    assert set(first) == set(names) and all(v["unseen_s"] > 0 and v["cached_s"] > 0 for v in first.values())
    assert [b["loras"][0]["name"] for b in sent[6:]] == ["bench0", "bench0", "bench1", "bench1"]


def test_bench_serve_on_a_cpu_asks_for_no_gpu_share():
    """The shipped config's GPU shares cannot be placed on a CPU-only machine: the CPU smoke run drops them."""
    import argparse

    from benchmarks import bench_serve

    args = argparse.Namespace(config="serve_config.yaml", model="tiny", device="cpu", set=None, one_gpu=False, port=1)
    shipped = bench_serve.app_config(args)
    for config, gpu_asked in ((shipped, True), (bench_serve.without_gpu_shares(shipped), False)):
        deployments = config["applications"][0]["deployments"]
        gpu_asks = {d["name"] for d in deployments if "num_gpus" in d.get("ray_actor_options", {})}
        denoiser = next(d for d in deployments if d["name"] == "Denoiser")
        policy_gpu = denoiser["autoscaling_config"]["policy"]["policy_kwargs"]["replica_resources"].get("GPU", 0)
        assert (gpu_asks == {"TextEncoder", "Denoiser", "VaeDecoder"} and policy_gpu > 0) == gpu_asked
        assert gpu_asked or (not gpu_asks and policy_gpu == 0)
