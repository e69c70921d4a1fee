"""The ControlNet on the GPU (full-size random DiT, random Union 2.1-shaped ControlNet, bf16 weights).

The reference is diffusers' eager path: its DiT (complex RoPE) and its ControlNet's blocks in bf16,
each 8-step 1024x1024 job run through our loop with the ControlNet joined to the eager DiT. Against
it, the default path (every setting `auto`, as a Denoiser builds it: `optimize_as_resolved`, the
ControlNet's blocks joined to the DiT's block path, CUDA graphs with the controlled variant, the
serving warm-up with the ControlNet's calls):

- plain: the default path's own error against eager bf16, measured first in the same test;
- controlled (plain control) and controlled in the inpainting layout (mask and masked-image latents
  in the 33 control channels): each within 1.5x of the plain error (and within FP8_LIMIT), while the
  control moves the image well past it; each one-image controlled job replays the controlled graph
  (the graphs' counters say so) where `auto` has graphs;
- a mixed batch (controlled, plain, controlled with the mask): its plain row equals the same row in a
  batch of plain jobs within the batch-invariance bound (FP8 attention's v scale is the batch's).

Also: the first controlled request after ready against a warm one, at 1024x1024 and at a non-square
preset, in a fresh process through the served stages (benchmarks/bench_controlnet.py, every setting
`auto`): at most 1.5x here, a bound that a compile or capture on the first request would break many
times over (the benchmark holds it against the 1.3x target, and times the controlled step against
the plain one).
With `ZIMAGE_GPU_REPORT=path.json` the figures are written there.

    pytest -q -s -m gpu tests/gpu/test_gpu_controlnet.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.gpu.test_gpu_dit import CAPTION_TOKENS, FP8_LIMIT, SEED, SIZE, STEPS, free_gpu, load, record, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = torch.device("cuda")
BATCH_NOISE = 2e-2  # a row beside others against the same row beside plain jobs (tests/gpu/test_gpu_lora.py)
FIRST_OVER_WARM = 1.5  # the first controlled request after ready against a warm one, at each size
ROOT = Path(__file__).resolve().parents[2]
LATENT = SIZE // 8


@pytest.fixture(scope="module")
def source():
    from deployments.weights.model_source import resolve_model_source

    return resolve_model_source("random")


def control(form: str, seed: int = SEED + 1):
    """A random control input at the default scale: "control" (plain) or "mask" (the inpainting layout)."""
    from deployments.denoiser.control import DEFAULT_CONTROL_SCALE, ControlContext, control_context

    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(1, 16, LATENT, LATENT, generator=g)
    keep = masked = None
    if form == "mask":
        keep = torch.ones(1, 1, LATENT, LATENT)
        keep[..., LATENT // 4 : 3 * LATENT // 4, LATENT // 4 : 3 * LATENT // 4] = 0.0  # edit the middle
        masked = torch.randn(1, 16, LATENT, LATENT, generator=g) * keep
    return ControlContext(control_context(latents, 33, keep, masked), DEFAULT_CONTROL_SCALE)


def make_job(form: str | None = None, seed: int = SEED):
    from deployments.contracts import DenoiseJob

    caption = torch.randn(CAPTION_TOKENS, 2560, generator=torch.Generator("cpu").manual_seed(seed))
    return DenoiseJob(caption=caption, width=SIZE, height=SIZE, steps=STEPS, seed=seed,
                      control=None if form is None else control(form, seed + 1))


FORMS = {"plain": None, "controlled": "control", "controlled_mask": "mask"}


def run(runner, source, jobs, transformer_fn=None) -> list[torch.Tensor]:
    from deployments.denoiser.loop import DenoiseLoop
    from deployments.weights.loading import load_scheduler

    loop = DenoiseLoop(runner.transformer, load_scheduler(source), DEVICE, torch.bfloat16, control=runner,
                       transformer_fn=transformer_fn, batch_invariant=False)
    return [latents.latents.float().cpu() for latents in loop.run(jobs)]


def controlnet():
    from deployments.weights.controlnet_source import load_controlnet, resolve_controlnet

    return load_controlnet(resolve_controlnet("random"), DEVICE, torch.bfloat16)


@pytest.fixture(scope="module")
def eager(source):
    """Eager bf16 latents of each form's job (diffusers' DiT and the ControlNet's blocks as loaded)."""
    from deployments.denoiser.control import ControlNetRunner

    free_gpu()
    runner = ControlNetRunner(controlnet(), load(source))
    out = {name: run(runner, source, [make_job(form)])[0] for name, form in FORMS.items()}
    del runner
    free_gpu()
    assert all(torch.isfinite(latents).all() for latents in out.values())
    return out


@pytest.fixture(scope="module")
def default_path(source, tmp_path_factory):
    """The DiT and ControlNet as a Denoiser builds them with every setting `auto`, warmed as it warms
    them before and after ready (one size, batches of 3), with its CUDA graphs where `auto` has them."""
    from deployments.denoiser.control import ControlNetRunner
    from deployments.denoiser.control_warmup import serving_control_calls
    from deployments.denoiser.dit.optimize import graphed_transformer_fn, optimize_as_resolved
    from deployments.denoiser.dit.warmup import run_calls, serving_calls
    from deployments.settings import ModelSettings

    settings = ModelSettings(model="random", device="cuda", controlnet="random")
    speed = settings.resolve_speed(DEVICE)
    free_gpu()
    transformer = optimize_as_resolved(load(source), speed, tmp_path_factory.mktemp("controlnet-compile"),
                                       settings.attention)
    runner = ControlNetRunner(controlnet(), transformer)
    single, batched = serving_calls([SIZE], 3, CAPTION_TOKENS)
    before, with_batches, with_shapes = serving_control_calls(single, batched, runner.takes_mask)
    start = time.perf_counter()
    run_calls(transformer, single + batched + before + with_batches, save=False, control=runner)
    record(controlnet_default_path=speed.summary("denoiser"), controlnet_warmup_s=time.perf_counter() - start,
           controlnet_fused_blocks=type(runner.controlnet.control_layers[0]).__name__)
    yield runner, graphed_transformer_fn(transformer, speed, DEVICE, runner)
    free_gpu()


def test_the_default_path_controls_within_its_plain_error(source, eager, default_path):
    runner, graphs = default_path
    errors, moved, replays = {}, {}, {}
    for name, form in FORMS.items():
        before = None if graphs is None else graphs.as_dict()
        (ours,) = run(runner, source, [make_job(form)], graphs)
        assert torch.isfinite(ours).all(), name
        errors[name] = rel_err(ours, eager[name])
        if name != "plain":
            moved[name] = rel_err(eager[name], eager["plain"])
        if graphs is not None:
            after = graphs.as_dict()
            replays[name] = after["replays"] - before["replays"]
    record(controlnet_vs_eager_bf16_rel_err=errors, controlnet_moved=moved, controlnet_graph_replays=replays,
           controlnet_step_graphs=None if graphs is None else graphs.as_dict())
    print("default path against eager bf16: " + ", ".join(f"{k} {v:.3e}" for k, v in errors.items())
          + "; the control moved eager bf16 by " + ", ".join(f"{k} {v:.3e}" for k, v in moved.items())
          + f"; graph replays per job {replays}")
    for name in ("controlled", "controlled_mask"):
        assert moved[name] > 5 * errors[name], name  # the control acts well past the path's error
        assert errors[name] <= 1.5 * errors["plain"], (name, errors)
        assert errors[name] <= FP8_LIMIT, (name, errors)
        if graphs is not None:
            assert replays[name] >= STEPS - 2, (name, replays)  # a first sight and a capture at most


def test_a_plain_row_beside_controlled_rows(source, default_path):
    runner, graphs = default_path
    mixed = run(runner, source, [make_job("control", SEED + 10), make_job(None, SEED + 11),
                                 make_job("mask", SEED + 12)], graphs)
    plain = run(runner, source, [make_job(None, SEED + 10), make_job(None, SEED + 11), make_job(None, SEED + 12)],
                graphs)
    err = rel_err(mixed[1], plain[1])
    record(controlnet_plain_row_beside_controlled_rel_err=err)
    print(f"a plain row in a batch with controlled rows vs the batch without control: {err:.3e}")
    assert err <= BATCH_NOISE
    assert rel_err(mixed[0], plain[0]) > 10 * max(err, 1e-4)  # its neighbours' control did act


@pytest.mark.timeout(1600)  # the stages' cold start (compiles) and every figure, past pytest's 600 s
def test_first_controlled_request_after_ready(tmp_path):
    """A fresh process (compiles and first calls are per process) builds the stages as a replica does,
    waits for every warm-up after ready, then sends the first controlled request at each size and
    the same request warm (benchmarks/bench_controlnet.py; its other figures are reported too)."""
    free_gpu()
    out = tmp_path / "controlnet.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "benchmarks/bench_controlnet.py", "--repeats", "3", "--requests", "3",
                    "--json", str(out)], cwd=ROOT, env=env, check=True, timeout=1500)
    result = json.loads(out.read_text())
    for row in result["first"]:
        record(**{f"controlnet_first_request_ms_{row['size']}": row["first_ms"],
                  f"controlnet_warm_request_ms_{row['size']}": row["warm_ms"]})
        print(f"first controlled request {row['size']}: {row['first_ms']:.1f} ms, warm {row['warm_ms']:.1f} ms "
              f"({row['ratio']:.2f}x)")
    record(controlnet_verdicts=result["verdicts"], controlnet_step=result.get("step"))
    assert all(row["ratio"] <= FIRST_OVER_WARM for row in result["first"]), result["first"]
