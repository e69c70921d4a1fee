"""The optimized DiT against diffusers' eager DiT on the full-size random model (bf16, one GPU).

One 8-step 1024x1024 job, same caption embedding and seed. Eager first (its latents kept on the
CPU), then the same weights optimized: bf16 real RoPE + fused projections + regional compile must
agree to 2e-2 relative (||a - b|| / ||b|| on the final latents); FP8's error is measured and
reported (finite and under 0.25 asserted). With `ZIMAGE_GPU_REPORT=path.json` the figures are
written there.

    pytest -q -m gpu tests/gpu/test_gpu_dit.py
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZE = 1024
STEPS = 8
SEED = 1234
CAPTION_TOKENS = 160
BF16_TOL = 2e-2
FP8_LIMIT = 0.25

REPORT: dict = {}


def record(**values) -> None:
    REPORT.update(values)
    path = os.environ.get("ZIMAGE_GPU_REPORT")
    if not path:
        return
    target = Path(path)
    existing = {}
    if target.is_file():
        try:
            existing = json.loads(target.read_text())
        except json.JSONDecodeError:
            existing = {}
    existing.update(REPORT)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(existing, indent=2, sort_keys=True))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def skip_without_fp8(precision: str = "fp8") -> None:
    """An FP8 case needs compute capability 8.9+ (Ada, Hopper); on an older GPU it is skipped."""
    from deployments.denoiser.dit.fp8 import FP8_MIN_CAPABILITY

    if precision == "fp8" and torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        pytest.skip("FP8 needs compute capability 8.9+")


def optimized(source, precision: str, cache_dir, **options):
    """A fresh load of `source` optimized for `precision` with compiled blocks, on a GPU freed first."""
    from deployments.denoiser.dit.optimize import optimize_transformer

    skip_without_fp8(precision)
    free_gpu()
    transformer = load(source)
    optimize_transformer(transformer, precision, compile=True, cache_dir=cache_dir, **options)
    return transformer


def check_output(out: torch.Tensor, err: float, limit: float) -> None:
    """Frees the GPU memory the test's model held (the caller has dropped it), then: `out` is finite
    and its error within `limit`."""
    free_gpu()
    assert torch.isfinite(out).all()
    assert err <= limit


@pytest.fixture(scope="module")
def source():
    from deployments.weights.model_source import resolve_model_source

    return resolve_model_source("random")


@pytest.fixture(scope="module")
def job():
    from deployments.contracts import DenoiseJob

    caption = torch.randn(CAPTION_TOKENS, 2560, generator=torch.Generator("cpu").manual_seed(SEED))
    return DenoiseJob(caption=caption, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)


def load(source):
    from deployments.weights.loading import load_transformer

    return load_transformer(source, torch.device("cuda"), torch.bfloat16)


def fingerprint(transformer) -> float:
    """Cheap identity check that two loads of `random` built the same weights."""
    return float(transformer.layers[0].feed_forward.w2.weight.float().sum() + transformer.x_pad_token.float().sum())


def warm_and_time(transformer, source, job) -> tuple[torch.Tensor, float, float]:
    """The size warm-up (it compiles), one run of `job` to settle, one timed: (latents, seconds of the
    timed run, seconds of the warm-up)."""
    from deployments.denoiser.dit.warmup import warmup

    start = time.perf_counter()
    warmup(transformer, [SIZE], caption_len=CAPTION_TOKENS)
    compile_s = time.perf_counter() - start
    run_job(transformer, source, job)
    latents, seconds = run_job(transformer, source, job)
    return latents, seconds, compile_s


def run_job(transformer, source, job) -> tuple[torch.Tensor, float]:
    from deployments.denoiser.loop import DenoiseLoop
    from deployments.weights.loading import load_scheduler

    loop = DenoiseLoop(transformer, load_scheduler(source), torch.device("cuda"), torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    (latents,) = loop.run([job])
    torch.cuda.synchronize()
    return latents.latents.float(), time.perf_counter() - start


@pytest.fixture(scope="module")
def reference(source, job):
    """diffusers' eager DiT (its own complex-RoPE processor), bf16, latents on the CPU."""
    free_gpu()
    transformer = load(source)
    weights_print = fingerprint(transformer)
    run_job(transformer, source, job)  # warm-up (cuBLAS handles, allocator)
    latents, seconds = run_job(transformer, source, job)
    record(device=torch.cuda.get_device_name(), torch=torch.__version__, eager_bf16_8steps_s=seconds)
    del transformer
    free_gpu()
    assert torch.isfinite(latents).all()
    return latents, weights_print


def test_bf16_compiled_matches_eager(source, job, reference, tmp_path_factory):
    from deployments.denoiser.dit.optimize import optimize_transformer

    ref, ref_print = reference
    transformer = load(source)
    assert fingerprint(transformer) == ref_print, "the two loads of 'random' differ"
    cache = tmp_path_factory.mktemp("compile-cache")
    optimize_transformer(transformer, "bf16", compile=True, cache_dir=cache)
    latents, seconds, compile_s = warm_and_time(transformer, source, job)
    err = rel_err(latents, ref)
    record(bf16_compiled_rel_err=err, bf16_compile_s=compile_s, bf16_compiled_8steps_s=seconds)
    print(f"bf16 compiled: rel err {err:.3e}, 8 steps {seconds * 1000:.0f} ms, compile {compile_s:.1f} s")
    del transformer
    check_output(latents, err, BF16_TOL)


def test_fp8_error_is_measured(source, job, reference, tmp_path_factory):
    from deployments.denoiser.dit.optimize import optimize_transformer

    skip_without_fp8()
    ref, ref_print = reference
    transformer = load(source)
    assert fingerprint(transformer) == ref_print, "the two loads of 'random' differ"
    cache = tmp_path_factory.mktemp("compile-cache-fp8")
    optimize_transformer(transformer, "fp8", compile=True, cache_dir=cache)
    resident_gb = torch.cuda.memory_allocated() / 2**30
    latents, seconds, compile_s = warm_and_time(transformer, source, job)
    err = rel_err(latents, ref)
    record(fp8_rel_err=err, fp8_compile_s=compile_s, fp8_compiled_8steps_s=seconds, fp8_resident_gb=resident_gb)
    print(f"fp8 compiled: rel err {err:.3e}, 8 steps {seconds * 1000:.0f} ms, compile {compile_s:.1f} s")
    del transformer
    check_output(latents, err, FP8_LIMIT)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_batch_invariance_within_bf16_noise(source, precision, tmp_path_factory):
    """A job made alone and the same job inside a ragged batch (other caption lengths and seeds,
    same resolution, as the continuous batcher forms them) agree within bf16 noise."""
    from deployments.contracts import DenoiseJob
    from deployments.denoiser.loop import DenoiseLoop
    from deployments.weights.loading import load_scheduler

    transformer = optimized(source, precision, tmp_path_factory.mktemp(f"bi-{precision}"), attention="cudnn")
    loop = DenoiseLoop(transformer, load_scheduler(source), torch.device("cuda"), torch.bfloat16)

    def make(tokens: int, seed: int) -> DenoiseJob:
        caption = torch.randn(tokens, 2560, generator=torch.Generator("cpu").manual_seed(seed))
        return DenoiseJob(caption=caption, width=SIZE, height=SIZE, steps=STEPS, seed=seed)

    target = make(CAPTION_TOKENS, SEED)
    others = [make(t, SEED + i + 1) for i, t in enumerate((37, 300, 96))]
    loop.run([target])  # compile both graphs before timing anything
    loop.run([target] + others)
    alone = loop.run([target])[0].latents.float()
    batched = loop.run(others[:1] + [target] + others[1:])[1].latents.float()
    again = loop.run([target])[0].latents.float()
    err, repeat_err = rel_err(batched, alone), rel_err(again, alone)
    record(**{f"batch_invariance_{precision}_rel_err": err, f"rerun_{precision}_rel_err": repeat_err})
    print(f"{precision}: alone vs ragged batch of 4 rel err {err:.2e} (alone twice: {repeat_err:.2e})")
    del transformer, loop
    check_output(batched, err, 2e-2)
