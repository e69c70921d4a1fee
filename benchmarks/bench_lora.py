"""LoRA adapters on the DiT's default path: the step with and without adapters, what each update costs
per linear, and the cost of an unseen adapter.

Every speed setting `auto`, resolved as a Denoiser resolves it (`ModelSettings.resolve_speed`,
`dit.optimize.optimize_as_resolved`; on an H100/H200: FP8 with the fused kernels, compile, CUDA
graphs), one run, figures side by side:

- one DiT forward at 1024x1024 (batch 1, a 160-token caption), CUDA graphs on both sides: no
  adapter, one rank-32 adapter on all seven target linears (target: at most 1.08x the plain step);
- the same adapter on a graph whose static factors have the adapter's own rank (padded to 16), not
  `step_graphs.LORA_GRAPH_RANK` (128): what the padding to the largest rank costs;
- a batch of 8 (no graphs: batches over one image run compiled without them): no adapters, and 8
  images over 4 rank-32 adapters, two images each (target: at most 1.12x the plain batch);
- per linear kind (FP8 only, unless `--no-kernels`): the base FP8 GEMM alone; what runs with an
  adapter, the GEMM over the weight and its tail of A rows with the update
  (`lora_linear_in_tail_us`, `lora.ops.fp8_lora_linear`), and that GEMM alone
  (`base_extended_gemm_us`); the base GEMM with the update whose down-projection is a GEMM of its own
  (`base_plus_update_us`: what a forward whose factors do not fit the tails runs), and the
  down-projections that GEMM could be (FP8 rows through cuBLAS's `_scaled_mm` with row-wise
  scales, or tensor-wise ones, the latter also padded to 128 outputs; the operands' roles
  swapped; a bf16 copy of the rows that the row kernels would have to write), the up-projection per
  part, batched over the parts (what runs) or as one GEMM against a block-diagonal B, and a read and
  write of the output (the in-place update's floor); each linear with the row kernel after it: the
  plain pair, the pair with one adapter whose update that kernel adds (`pair_lora_in_kernel_us`,
  `lora.consumers`: what runs) and the pair with the linear's own update (`pair_lora_separate_update_us`);
- an unseen rank-32 adapter file: `AdapterCache.resolve` (read, convert, lay out on the GPU) against
  a cached one (target: at most 1.5 s more).

    python -m benchmarks.bench_lora --out benchmarks/results/lora.json            # one GPU, model random
    python -m benchmarks.bench_lora --model tiny --device cpu --size 256 --repeats 2 --no-kernels  # smoke

Prints a table (each target met or not) and writes JSON with device, date and commit. The served
figures (20 clients with and without adapters, the first request for an unseen adapter) are
bench_serve's (`--lora-random 8`, its docstring).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.run_info import commit

TARGETS = {"b1_ratio": 1.08, "b8_ratio": 1.12, "unseen_minus_cached_s": 1.5}


def timed(fn, device: torch.device, repeats: int, warmups: int = 2) -> float:
    """Median milliseconds of `fn()` (device-synchronized)."""
    for _ in range(warmups):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def gpu_us(fn, repeats: int = 50) -> float:
    """Median microseconds of `fn()` by CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def kernel_figures(transformer, slots, rows: int, rank: int) -> dict[str, dict[str, float]]:
    """Per linear kind at `rows` tokens, one block's linear: see the module docstring."""
    from deployments.denoiser.lora.layout import padded_rank, quantize_rows
    from deployments.denoiser.lora.ops import update

    out = {}
    g = torch.Generator("cuda").manual_seed(0)
    for kind in slots.kinds.values():
        module = slots.modules[kind.paths[0]]
        d_in, parts, r = kind.in_features, kind.parts, padded_rank(rank)
        x = torch.randn(rows, d_in, device="cuda", generator=g, dtype=torch.bfloat16)
        xs = x.float().abs().amax(-1, keepdim=True) / 448
        xq = (x.float() / xs).to(torch.float8_e4m3fn)
        a, a_scale = quantize_rows(torch.randn(1, parts, r, d_in, device="cuda", generator=g) / d_in**0.5)
        b = torch.randn(1, parts, kind.part_out, r, device="cuda", generator=g, dtype=torch.bfloat16) * 0.01
        groups = torch.zeros(1, dtype=torch.int64, device="cuda")
        a_dense = (a.float() * a_scale.unsqueeze(-1)).to(torch.bfloat16).reshape(-1, d_in)
        y, x_side = module(xq, xs), torch.empty_like(x)
        figures = {
            "base_us": gpu_us(lambda: module(xq, xs)),
            "base_plus_update_us": gpu_us(lambda: update(module(xq, xs), xq, xs, a, a_scale, b, groups)),
            "down_rowwise_gemm_us": gpu_us(lambda: torch._scaled_mm(
                xq, a.reshape(-1, d_in).t(), scale_a=xs, scale_b=a_scale.reshape(1, -1), out_dtype=torch.bfloat16,
                use_fast_accum=True)),
            # a bf16 side output: the row kernel also writes its rows in bf16 (one write), the GEMM reads them
            "down_bf16_side_output_us": gpu_us(lambda: (x_side.zero_(), torch.mm(x, a_dense.t()))),
            "output_read_write_us": gpu_us(lambda: torch.empty_like(y).copy_(y)),
        }
        figures["update_us"] = figures["base_plus_update_us"] - figures["base_us"]
        figures["update_over_base"] = figures["base_plus_update_us"] / figures["base_us"]
        if slots.tails:
            figures.update(tail_figures(slots, kind, module, xq, xs, b, groups))
            figures["in_tail_over_base"] = figures["lora_linear_in_tail_us"] / figures["base_us"]
            figures.update(consumer_figures(transformer, slots, kind, module, xq, xs, b, groups))
        figures.update(down_figures(module, xq, xs, a, a_scale, b, groups))
        out[kind.key] = {k: float(f"{v:.4g}") for k, v in figures.items()}
    return out


def tail_figures(slots, kind, module, xq, xs, b, groups) -> dict[str, float]:
    """The linear as a forward with one adapter runs it: one GEMM over the weight and its tail (laid out
    for one group, as the LoRA graphs read it), then the up-projection."""
    from deployments.denoiser.dit.fp8_gemm import fp8_gemm
    from deployments.denoiser.lora import ops

    tail_a, tail_scale = slots.tails[kind.key].layout(1, slots.tail_rank)
    slot = -1  # an id no linear has
    ops.FACTORS[slot] = ops.SlotFactors(tail_a[0], tail_scale[0], b, groups, True)
    try:
        return {
            "base_extended_gemm_us": gpu_us(lambda: fp8_gemm(xq, xs, module.extended, module.extended_scale)),
            "lora_linear_in_tail_us": gpu_us(lambda: ops.fp8_lora_linear(
                xq, xs, module.extended, module.extended_scale, module.out_features, torch.tensor(slot))),
        }
    finally:
        del ops.FACTORS[slot]


def consumer_figures(transformer, slots, kind, module, xq, xs, b, groups) -> dict[str, float]:
    """Each FP8 linear with the row kernel after it (`lora.consumers`): the plain pair (the linear, then
    its kernel), the pair with one adapter as it runs now (the GEMM over weight and tail, the kernel
    adding the up-projection as it reads the output) and as it ran before (`fp8_lora_linear` with its
    own update, then the plain kernel)."""
    from deployments.denoiser.dit.fp8_attention import qkv_norm_rope_quant
    from deployments.denoiser.dit.fused_quant import gated_residual, swiglu_quant
    from deployments.denoiser.lora import consumers, ops, residual_consumer

    if kind.name not in ("attention.to_qkv", "attention.to_out.0", "feed_forward.w13", "feed_forward.w2"):
        return {}
    tail_a, tail_scale = slots.tails[kind.key].layout(1, slots.tail_rank)
    slot = int(module.lora_slot)
    ops.FACTORS[slot] = ops.SlotFactors(tail_a[0], tail_scale[0], b, groups, True)
    rows = xq.shape[0]
    if kind.name == "attention.to_qkv":
        attn = transformer.get_submodule(kind.blocks[0]).attention
        angles = torch.rand(rows, kind.part_out // attn.heads // 2, device=xq.device) * 6.28
        norms = (attn.norm_q.weight, attn.norm_k.weight, torch.stack((angles.cos(), angles.sin()), dim=-1).contiguous(),
                 attn.qk_descale, attn.heads, attn.norm_q.eps, attn.norm_k.eps)

        def plain():
            return qkv_norm_rope_quant(module(xq, xs), *norms)

        def fused():
            return consumers.qkv_norm_rope_quant_lora(module, xq, xs, *norms)

        def separate():
            return qkv_norm_rope_quant(ops.fp8_lora_linear(xq, xs, module.extended, module.extended_scale,
                                                           module.out_features, module.lora_slot), *norms)
    elif kind.name in ("attention.to_out.0", "feed_forward.w2"):
        block = transformer.get_submodule(kind.blocks[0])
        dim = kind.part_out
        x = torch.randn(1, rows, dim, device=xq.device, dtype=torch.bfloat16)
        gate = torch.rand(1, dim, device=xq.device, dtype=torch.bfloat16)
        if kind.name == "attention.to_out.0":  # then the feed-forward's norm, fused in
            norm = (block.attention_norm2.weight, gate, block.attention_norm2.eps)
            next_norm = (block.ffn_norm1.weight, 1.0 + gate, block.ffn_norm1.eps)
        else:
            norm, next_norm = (block.ffn_norm2.weight, gate, block.ffn_norm2.eps), None

        def plain():
            return gated_residual(x, module(xq, xs).view(x.shape), *norm, next_norm=next_norm)

        def fused():
            return residual_consumer.gated_residual_lora(x, module, xq, xs, *norm, next_norm=next_norm)

        def separate():
            return gated_residual(x, ops.fp8_lora_linear(xq, xs, module.extended, module.extended_scale,
                                                         module.out_features, module.lora_slot).view(x.shape),
                                  *norm, next_norm=next_norm)
    else:
        def plain():
            return swiglu_quant(module(xq, xs))

        def fused():
            return consumers.swiglu_quant_lora(module, xq, xs)

        def separate():
            return swiglu_quant(ops.fp8_lora_linear(xq, xs, module.extended, module.extended_scale,
                                                    module.out_features, module.lora_slot))
    try:
        figures = {"pair_plain_us": gpu_us(plain), "pair_lora_in_kernel_us": gpu_us(fused),
                   "pair_lora_separate_update_us": gpu_us(separate)}
    finally:
        del ops.FACTORS[slot]
    figures["pair_lora_in_kernel_over_plain"] = figures["pair_lora_in_kernel_us"] / figures["pair_plain_us"]
    return figures


def down_figures(module, xq, xs, a, a_scale, b, groups) -> dict[str, float]:
    """The down-projection's other forms (the row-wise GEMM that runs is `down_rowwise_gemm_us`), and
    the up-projection's."""
    from deployments.denoiser.lora import ops

    d_in = xq.shape[1]
    a2d = a.reshape(-1, d_in)
    one = torch.ones((), device=xq.device)
    padded = torch.zeros(-(-a2d.shape[0] // 128) * 128, d_in, device=xq.device).to(a2d.dtype)
    padded[: a2d.shape[0]] = a2d
    figures = {
        "down_tensorwise_gemm_us": gpu_us(lambda: torch._scaled_mm(
            xq, a2d.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=True)),
        "down_tensorwise_gemm_n128_us": gpu_us(lambda: torch._scaled_mm(
            xq, padded.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=True)),
        "down_rowwise_gemm_swapped_us": gpu_us(lambda: torch._scaled_mm(
            a2d, xq.t(), scale_a=a_scale.reshape(-1, 1), scale_b=xs.reshape(1, -1), out_dtype=torch.bfloat16,
            use_fast_accum=True)),
    }
    parts, part_out, rank = b.shape[1], b.shape[2], b.shape[3]
    if parts > 1:  # the up-projection as one GEMM against a block-diagonal B, not one per part
        diagonal = torch.zeros(parts * part_out, parts * rank, device=b.device, dtype=b.dtype)
        for part in range(parts):
            diagonal[part * part_out : (part + 1) * part_out, part * rank : (part + 1) * rank] = b[0, part]
        h = ops._down(xq, xs, a2d, a_scale.reshape(1, -1), torch.bfloat16)
        y = module(xq, xs)
        figures["up_one_gemm_block_diagonal_us"] = gpu_us(lambda: y.addmm_(h, diagonal.t()))
        figures["up_per_part_us"] = gpu_us(lambda: [
            y.view(-1, parts, part_out)[:, p].addmm_(h.view(-1, parts, rank)[:, p], b[0, p].t()) for p in range(parts)])
        figures["up_parts_batched_us"] = gpu_us(lambda: y.view(-1, parts, part_out).transpose(0, 1).baddbmm_(
            h.view(-1, parts, rank).transpose(0, 1), b[0].transpose(1, 2)))  # what `ops.update` runs
    return figures


def table(figures: dict, kernels: dict) -> str:
    lines = [f"{'figure':<34}{'value':>12}{'target':>10}  met"]

    def row(name, value, target=None, lower_is_better=True):
        met = "" if target is None else ("yes" if (value <= target if lower_is_better else value >= target) else "NO")
        lines.append(f"{name:<34}{value:>12.3f}{'' if target is None else f'{target:>10}':>10}  {met}")

    for name in ("b1_plain_ms", "b1_one_adapter_ms"):
        row(name, figures[name])
    row("b1_ratio", figures["b1_ratio"], TARGETS["b1_ratio"])
    if "b1_own_rank_graph_ratio" in figures:
        row("b1_one_adapter_own_rank_graph_ms", figures["b1_one_adapter_own_rank_graph_ms"])
        row("b1_own_rank_graph_ratio", figures["b1_own_rank_graph_ratio"], TARGETS["b1_ratio"])
    for name in ("b8_plain_ms", "b8_four_adapters_ms"):
        row(name, figures[name])
    row("b8_ratio", figures["b8_ratio"], TARGETS["b8_ratio"])
    row("unseen_minus_cached_s", figures["unseen_minus_cached_s"], TARGETS["unseen_minus_cached_s"])
    for kind, values in kernels.items():
        lines.append(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--caption-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-kernels", action="store_true", help="skip the per-linear figures")
    parser.add_argument("--tail-rank", type=int, default=None,
                        help="rows per part of the FP8 weights' tails (default lora.slots.TAIL_RANK): what a smaller "
                             "tail buys the one-adapter step on a graph of the adapter's own rank")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from benchmarks.lora_files import write_random_adapters
    from deployments.contracts import LoraRef
    from deployments.denoiser.dit.optimize import graphed_transformer_fn, optimize_as_resolved
    from deployments.denoiser.dit.warmup import run_calls, serving_calls
    from deployments.denoiser.loop import diffusers_transformer_fn
    from deployments.denoiser.lora.cache import AdapterCache
    from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
    from deployments.denoiser.lora.slots import install_lora
    from deployments.geometry import latent_shape
    from deployments.settings import ModelSettings
    from deployments.weights.loading import load_transformer

    if args.tail_rank is not None:
        from deployments.denoiser.lora import slots as lora_slots

        lora_slots.TAIL_RANK = args.tail_rank  # what the slots installed below take
    settings = ModelSettings(model=args.model, device=args.device)
    device, dtype = settings.torch_device(), settings.dtype()
    speed = settings.resolve_speed(device)
    transformer = load_transformer(settings.source(), device, dtype)
    directory = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    # 4 for the batch, 1 never loaded before the unseen-adapter timing
    write_random_adapters(transformer, directory, count=5, rank=args.rank, prefix="adapter")
    transformer = optimize_as_resolved(transformer, speed, tempfile.mkdtemp(prefix="bench-lora-compile-"),
                                       settings.attention)
    slots = install_lora(transformer)
    graphs = graphed_transformer_fn(transformer, speed, device)
    cache = AdapterCache(LoraLibrary(LoraSettings(lora_dir=str(directory))), slots, capacity_bytes=1 << 40)
    adapters = [cache.resolve([LoraRef(f"adapter{i}")])[0] for i in range(4)]

    generator = torch.Generator("cpu").manual_seed(0)
    shape = latent_shape(transformer.config.in_channels, args.size, args.size)

    def inputs(batch: int):
        latents = [torch.randn(shape, generator=generator).to(device, dtype).unsqueeze(2)[0] for _ in range(batch)]
        captions = [torch.randn(args.caption_tokens, transformer.config.cap_feat_dim, generator=generator)
                    .to(device, dtype) for _ in range(batch)]
        return latents, torch.full((batch,), 0.5, device=device), captions

    plain_fn = diffusers_transformer_fn(transformer)

    def step(batch: int, rows):
        latents, t, captions = inputs(batch)
        fn = graphs if (graphs is not None and batch == 1) else plain_fn

        @torch.inference_mode()
        def call():
            with slots.using(rows):
                fn(latents, t, captions)

        return call

    if speed.compile.value:  # every graph both steps use, as the serving warm-up compiles them
        single, batched = serving_calls([(args.size, args.size)], args.batch, args.caption_tokens, lora=True)
        run_calls(transformer, single + batched, save=False)
    figures: dict[str, float] = {}
    figures["b1_plain_ms"] = timed(step(1, [()]), device, args.repeats)
    figures["b1_one_adapter_ms"] = timed(step(1, [(adapters[0],)]), device, args.repeats)
    if graphs is not None:  # the same graph on static factors of the adapter's own rank, not LORA_GRAPH_RANK's
        from deployments.denoiser.dit.step_graphs import GraphedTransformerFn
        from deployments.denoiser.lora.layout import padded_rank

        own_rank = GraphedTransformerFn.on(plain_fn, device, padded=graphs.padded, lora=slots,
                                           lora_rank=padded_rank(args.rank))
        latents, t, captions = inputs(1)

        @torch.inference_mode()
        def own_rank_step():
            with slots.using([(adapters[0],)]):
                own_rank(latents, t, captions)

        figures["b1_one_adapter_own_rank_graph_ms"] = timed(own_rank_step, device, args.repeats)
        figures["b1_own_rank_graph_ratio"] = figures["b1_one_adapter_own_rank_graph_ms"] / figures["b1_plain_ms"]
    figures["b8_plain_ms"] = timed(step(args.batch, [()] * args.batch), device, args.repeats)
    four = [(adapters[i * 4 // args.batch],) for i in range(args.batch)]
    figures["b8_four_adapters_ms"] = timed(step(args.batch, four), device, args.repeats)
    figures["b1_ratio"] = figures["b1_one_adapter_ms"] / figures["b1_plain_ms"]
    figures["b8_ratio"] = figures["b8_four_adapters_ms"] / figures["b8_plain_ms"]

    start = time.perf_counter()
    cache.resolve([LoraRef("adapter4")])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    figures["unseen_adapter_s"] = time.perf_counter() - start
    start = time.perf_counter()
    cache.resolve([LoraRef("adapter4")])
    figures["cached_adapter_s"] = time.perf_counter() - start
    figures["unseen_minus_cached_s"] = figures["unseen_adapter_s"] - figures["cached_adapter_s"]
    figures["adapter_file_bytes"] = (directory / "adapter4.safetensors").stat().st_size
    figures["adapter_resident_bytes"] = cache.resolve([LoraRef("adapter4")])[0][0].nbytes

    kernels = {}
    if device.type == "cuda" and slots.fp8 and not args.no_kernels:
        from deployments.geometry import image_tokens

        kernels = kernel_figures(transformer, slots, image_tokens(args.size, args.size) + args.caption_tokens, args.rank)
    result = {
        "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
                 "speed": speed.as_dict(("precision", "fp8_kernels", "compile", "dit_cuda_graphs"))},
        "figures": figures,
        "kernels": kernels,
        "step_graphs": None if graphs is None else graphs.as_dict(),
        "targets": TARGETS,
        "met": {name: figures[name] <= target for name, target in TARGETS.items()},
    }
    print(json.dumps(result, indent=2))
    print(table(figures, kernels))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
