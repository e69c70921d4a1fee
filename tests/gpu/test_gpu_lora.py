"""LoRA on the GPU, full-size random model, on the path `auto` picks (on an H100/H200: FP8 with the
fused kernels, compile, CUDA graphs for one image): unmerged adapters (`lora.ops`) against bf16
eager with the same adapters merged into the weights (W + s B A), one 8-step 1024x1024 job each.

- the plain default path's own error against plain bf16 eager, measured first: each job with
  adapters must stay within 1.5x of it (against its merged reference), and within LORA_LIMIT;
- one adapter (rank 32, all seven target linears), each of ranks 4 and 128, one on the attention
  only, and four at once (scales 1, 0.5, -0.7, 2);
- one image with adapters replays a CUDA graph (the graph's counters say so);
- a row without adapters in a batch with adapters equals the same batch without any within the
  batch-invariance bound (FP8 attention's v scale is the batch's: the other rows move it).

`ZIMAGE_GPU_REPORT=path.json` keeps the figures.

    pytest -q -s -m gpu tests/gpu/test_gpu_lora.py
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gpu_dit import CAPTION_TOKENS, SEED, SIZE, STEPS, free_gpu, load, record, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
CASES = {  # name: [(rank, seed, targets or None for all, scale)]
    "rank32": [(32, 1, None, 0.8)],
    "rank4": [(4, 2, None, 1.0)],
    "rank128": [(128, 3, None, -0.5)],
    "attention_only": [(16, 4, ATTENTION, 1.5)],
    "four": [(4, 2, None, 1.0), (32, 1, None, 0.5), (128, 3, None, -0.7), (16, 4, ATTENTION, 2.0)],
}
# From the figures this test printed on an H100 (2026-12-07; RESULTS.md): the default path's own error
# against bf16 1.70e-2, with adapters against merged bf16 1.67e-2 to 1.79e-2; a row without adapters
# beside rows with them 1.06e-2 from the batch without. The 1.5x rule against the path's own error is
# the tighter bound.
LORA_LIMIT = 0.03
BATCH_NOISE = 2e-2
STRENGTH = 0.15  # moves the bf16 image by about 10%: past the path's own error several times over


@pytest.fixture(scope="module")
def source():
    from deployments.weights.model_source import resolve_model_source

    return resolve_model_source("random")


@pytest.fixture(scope="module")
def factors(source):
    """Each (rank, seed, targets) adapter's factors, on the CPU, strong enough to move the image."""
    from benchmarks.lora_files import transformer_shapes
    from deployments.denoiser.lora.random_adapters import TARGETS, random_factors

    shapes = transformer_shapes("random")
    made = {}
    for spec in {spec[:3] for specs in CASES.values() for spec in specs}:
        rank, seed, targets = spec
        made[spec] = random_factors(shapes, rank, seed=seed, strength=STRENGTH, targets=targets or TARGETS)
    return made


def job(adapters=(), seed: int = SEED, tokens: int = CAPTION_TOKENS):
    from deployments.contracts import DenoiseJob, LoraRef

    caption = torch.randn(tokens, 2560, generator=torch.Generator("cpu").manual_seed(seed))
    return DenoiseJob(caption=caption, width=SIZE, height=SIZE, steps=STEPS, seed=seed, adapters=tuple(adapters),
                      loras=tuple(LoraRef(a.name, s) for a, s in adapters))


def run(transformer, source, jobs, transformer_fn=None):
    from deployments.denoiser.loop import DenoiseLoop
    from deployments.weights.loading import load_scheduler

    loop = DenoiseLoop(transformer, load_scheduler(source), torch.device("cuda"), torch.bfloat16,
                       transformer_fn=transformer_fn, batch_invariant=False)
    return [latents.latents.float() for latents in loop.run(jobs)]


@pytest.fixture(scope="module")
def references(source, factors):
    """bf16 eager latents: plain, and each case with its adapters merged (W += s B A, float32, then bf16)."""
    free_gpu()
    transformer = load(source)
    touched = {path for made in factors.values() for path in made}
    originals = {path: transformer.get_submodule(path).weight.detach().clone() for path in touched}
    out = {"plain": run(transformer, source, [job()])[0].cpu()}
    with torch.no_grad():
        for name, specs in CASES.items():
            for path, original in originals.items():
                weight = original.float()
                for rank, seed, targets, scale in specs:
                    a, b = factors[(rank, seed, targets)].get(path, (None, None))
                    if a is not None:
                        weight += scale * (b.cuda() @ a.cuda())
                transformer.get_submodule(path).weight.copy_(weight.to(original.dtype))
            out[name] = run(transformer, source, [job()])[0].cpu()
    del transformer, originals
    free_gpu()
    return out


@pytest.fixture(scope="module")
def default_path(source, tmp_path_factory):
    """The DiT as a Denoiser builds it with every setting `auto`, warmed for one image and batches of 3
    with and without adapters; its CUDA graphs (where `auto` has them)."""
    from deployments.denoiser.dit.optimize import graphed_transformer_fn, optimize_as_resolved
    from deployments.denoiser.dit.warmup import run_calls, serving_calls
    from deployments.settings import ModelSettings

    settings = ModelSettings(model="random", device="cuda")
    speed = settings.resolve_speed(torch.device("cuda"))
    free_gpu()
    transformer = optimize_as_resolved(load(source), speed, tmp_path_factory.mktemp("lora-compile"),
                                       settings.attention)
    single, batched = serving_calls([SIZE], 3, CAPTION_TOKENS, lora=True)
    run_calls(transformer, single + batched, save=False)
    record(lora_default_path=speed.summary("denoiser"))
    yield transformer, graphed_transformer_fn(transformer, speed, torch.device("cuda"))
    free_gpu()


def adapters_for(transformer, factors, specs):
    from deployments.denoiser.lora.adapter import LoraAdapter

    slots = transformer._lora_slots
    return [(slots.lay_out(LoraAdapter(f"r{rank}-{seed}", factors[(rank, seed, targets)])), scale)
            for rank, seed, targets, scale in specs]


def test_adapters_on_the_default_path_against_merged_bf16(source, factors, references, default_path):
    transformer, graphs = default_path
    (plain,) = run(transformer, source, [job()], graphs)
    plain_err = rel_err(plain.cpu(), references["plain"])
    errors = {}
    for name, specs in CASES.items():
        replays = None if graphs is None else graphs.stats["replays"]
        (ours,) = run(transformer, source, [job(adapters_for(transformer, factors, specs))], graphs)
        assert torch.isfinite(ours).all()
        errors[name] = rel_err(ours.cpu(), references[name])
        if graphs is not None and name != "four":  # four at once: 192 ranks (padded), over the graphs' 128
            assert graphs.stats["replays"] > replays, name  # an image with adapters replayed its graph
    moved = rel_err(references["rank32"], references["plain"])
    record(lora_plain_vs_bf16_rel_err=plain_err, lora_vs_merged_bf16_rel_err=errors, lora_merged_moved=moved,
           lora_step_graphs=None if graphs is None else graphs.as_dict())
    print(f"default path plain vs bf16 eager: {plain_err:.3e}; with adapters vs merged bf16: "
          + ", ".join(f"{k} {v:.3e}" for k, v in errors.items()) + f"; the rank-32 adapter moved bf16 by {moved:.3e}")
    assert moved > 3 * plain_err  # the adapters change the image well past the path's own error
    for name, err in errors.items():
        assert err <= max(1.5 * plain_err, 1e-3), (name, err, plain_err)
        assert err <= LORA_LIMIT, (name, err)


def test_a_row_without_adapters_beside_rows_with_them(source, factors, default_path):
    transformer, graphs = default_path
    one = adapters_for(transformer, factors, CASES["rank32"])
    two = adapters_for(transformer, factors, CASES["attention_only"])
    jobs = [job(one, seed=SEED + 1), job(seed=SEED + 2), job(two, seed=SEED + 3)]
    with_adapters = run(transformer, source, jobs, graphs)
    without = run(transformer, source, [job(seed=SEED + 1), job(seed=SEED + 2), job(seed=SEED + 3)], graphs)
    err = rel_err(with_adapters[1], without[1])
    record(lora_plain_row_beside_adapters_rel_err=err)
    print(f"a row without adapters in a batch with them vs the batch without: {err:.3e}")
    assert err <= BATCH_NOISE
    assert rel_err(with_adapters[0], without[0]) > 3 * max(err, 1e-4)  # its neighbours' adapters did act
