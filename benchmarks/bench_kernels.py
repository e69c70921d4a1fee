"""The fused FP8 kernels one by one against what they replace, at the DiT's shapes (one GPU).

    python benchmarks/bench_kernels.py --json kernels.json [--sizes 512,1024,2048]

For each image size (batch 1, a 160-token caption: 1184 / 4256 / 16544 tokens), per block:
- `norm_modulate_quant` against inductor compiling the stock code (diffusers' RMSNorm, the adaLN
  scale, torchao's rowwise FP8 cast);
- `gated_residual` with the next norm fused, against the stock residual then the next norm + cast;
- `swiglu_quant` against silu * gate then the cast; `gated_residual` alone (end of the block);
- the attention's inputs (per-head norms + RoPE; with FP8 also the cast) and the attention itself:
  cuDNN bf16 SDPA against cuDNN FP8 SDPA (`fp8_attention`), with its graph build time;
- for each, the host time per call (Python, dispatch and launch, without waiting for the GPU).
Median of the timed runs (each 20 calls replayed from one CUDA graph, CUDA events), in microseconds
per call; the
"per step" column multiplies by the 34 blocks of a step (2 + 2 refiners, 30 main layers).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F

from benchmarks.harness import cuda_missing, cuda_time_ms, graphed
from benchmarks.run_info import commit
from deployments.denoiser.dit import fp8_attention, fused_quant

DIM, HIDDEN, HEADS, HEAD_DIM, CAPTION = 3840, 10240, 30, 128, 160
BLOCKS_PER_STEP = 34
CALLS = 20


def tokens(size: int) -> int:
    return (size // 16) ** 2 + CAPTION


def time_us(fn, repeats: int) -> float:
    """GPU microseconds per call: `CALLS` calls captured in one CUDA graph and replayed, so that the
    figure is the kernels' time and not Python's launch overhead (which hides the shortest kernels)."""
    replay = graphed(fn, calls=CALLS)
    replay()
    torch.cuda.synchronize()
    runs = [cuda_time_ms(replay) * 1000.0 / CALLS for _ in range(repeats)]
    return statistics.median(runs)


def rms_norm_stock(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm: float32 statistics, bf16 result times the bf16 weight."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(weight.dtype) * weight


def cast_rows_stock(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's rowwise dynamic FP8 cast of a bf16 activation."""
    scale = y.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448.0
    return (y.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def launch_us(fn, calls: int = 200) -> float:
    """Host microseconds per call (Python, dispatch, launch), the GPU left to catch up at the end:
    what a step pays on the CPU for each call, which bounds the step when its kernels are short."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / calls * 1e6


def stock_functions():
    compile_ = lambda fn: torch.compile(fn, dynamic=False, fullgraph=True)

    @compile_
    def norm_quant(x, w, mod):
        return cast_rows_stock(rms_norm_stock(x, w, 1e-6) * mod)

    @compile_
    def residual_then_norm_quant(x, y, w, gate, w2, mod):
        x = x + gate * rms_norm_stock(y, w, 1e-5)
        return x, cast_rows_stock(rms_norm_stock(x, w2, 1e-6) * mod)

    @compile_
    def swiglu_cast(h):
        a, b = h.chunk(2, dim=-1)
        return cast_rows_stock(F.silu(a) * b)

    @compile_
    def residual(x, y, w, gate):
        return x + gate * rms_norm_stock(y, w, 1e-5)

    @compile_
    def attention_inputs(qkv, wq, wk, cos, sin):
        q, k, v = (t.unflatten(-1, (HEADS, -1)) for t in qkv.chunk(3, dim=-1))
        q, k = rms_norm_stock(q, wq, 1e-5), rms_norm_stock(k, wk, 1e-5)

        def rope(t):
            pairs = t.float().unflatten(-1, (-1, 2))
            e, o = pairs[..., 0], pairs[..., 1]
            return torch.stack((e * cos - o * sin, e * sin + o * cos), -1).flatten(-2).to(t.dtype)

        return rope(q), rope(k), v

    return norm_quant, residual_then_norm_quant, swiglu_cast, residual, attention_inputs


def bench_size(size: int, repeats: int, stock) -> list[dict[str, Any]]:
    norm_quant, residual_then_norm_quant, swiglu_cast, residual, attention_inputs = stock
    rows_n = tokens(size)
    g = torch.Generator("cuda").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, device="cuda").to(torch.bfloat16)
    x, y, w, w2 = make(1, rows_n, DIM), make(1, rows_n, DIM), make(DIM), make(DIM)
    mod, gate = make(1, 1, DIM), make(1, 1, DIM)
    h = make(rows_n, 2 * HIDDEN)
    qkv = make(rows_n, 3 * DIM)
    wq, wk = make(HEAD_DIM), make(HEAD_DIM)
    angles = torch.rand(rows_n, HEAD_DIM // 2, device="cuda") * 2 * math.pi
    rope = torch.stack((angles.cos(), angles.sin()), -1).contiguous()
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    qk_descale = fp8_attention.qk_static_scales(wq, wk)
    out: list[dict[str, Any]] = []

    def pair(name: str, stock_fn, fused_fn) -> None:
        stock_us, fused_us = time_us(stock_fn, repeats), time_us(fused_fn, repeats)
        out.append({"size": size, "kernel": name, "stock_us": stock_us, "fused_us": fused_us,
                    "stock_launch_us": launch_us(stock_fn), "fused_launch_us": launch_us(fused_fn)})
        print(f"  {size:>5} {name:<28} stock {stock_us:9.1f} us   fused {fused_us:9.1f} us   "
              f"{stock_us / fused_us:5.2f}x   per step -{(stock_us - fused_us) * BLOCKS_PER_STEP / 1000:.2f} ms   "
              f"host per call: stock {out[-1]['stock_launch_us']:.1f} us, fused {out[-1]['fused_launch_us']:.1f} us",
              flush=True)

    pair("norm_modulate_quant", lambda: norm_quant(x, w, mod),
         lambda: fused_quant.norm_modulate_quant(x, w, mod[:, 0], 1e-6))
    pair("gated_residual+next_norm", lambda: residual_then_norm_quant(x, y, w, gate, w2, mod),
         lambda: fused_quant.gated_residual(x, y, w, gate[:, 0], 1e-5, (w2, mod[:, 0], 1e-6)))
    pair("swiglu_quant", lambda: swiglu_cast(h), lambda: fused_quant.swiglu_quant(h))
    pair("gated_residual", lambda: residual(x, y, w, gate), lambda: fused_quant.gated_residual(x, y, w, gate[:, 0], 1e-5))
    pair("attention_inputs", lambda: attention_inputs(qkv, wq, wk, cos, sin),
         lambda: fp8_attention.qkv_norm_rope_quant(qkv, wq, wk, rope, qk_descale, HEADS, 1e-5, 1e-5))

    if fp8_attention.cudnn_fp8_attention_available(torch.device("cuda")):
        q16, k16, v16 = (t.to(torch.bfloat16) for t in attention_inputs(qkv, wq, wk, cos, sin))
        q16, k16, v16 = (t.unsqueeze(0).transpose(1, 2) for t in (q16, k16, v16))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def bf16_attention():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q16, k16, v16)

        q8, k8, v8, v_descale = fp8_attention.qkv_norm_rope_quant(qkv, wq, wk, rope, qk_descale, HEADS, 1e-5, 1e-5)
        shape = (1, rows_n, DIM)
        t0 = time.perf_counter()
        fp8_attention.sdpa_fp8(q8.view(shape), k8.view(shape), v8.view(shape), qk_descale[0:1], qk_descale[1:2],
                               v_descale, HEADS)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        pair("attention", bf16_attention, lambda: fp8_attention.sdpa_fp8(
            q8.view(shape), k8.view(shape), v8.view(shape), qk_descale[0:1], qk_descale[1:2], v_descale, HEADS))
        flops = 4 * rows_n * rows_n * DIM
        out[-1].update(graph_build_s=build_s, stock_tflops=flops / out[-1]["stock_us"] / 1e6,
                       fused_tflops=flops / out[-1]["fused_us"] / 1e6)
        print(f"        cuDNN FP8 graph built in {build_s:.2f} s; bf16 {out[-1]['stock_tflops']:.0f} TFLOP/s, "
              f"FP8 {out[-1]['fused_tflops']:.0f} TFLOP/s", flush=True)
    else:
        print("  (cuDNN FP8 attention unavailable: pip install nvidia-cudnn-frontend, on sm_90)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024,2048")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if cuda_missing("bench_kernels.py"):
        return 2
    stock = stock_functions()
    rows: list[dict[str, Any]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows += bench_size(size, args.repeats, stock)
    per_step = {}
    for size in {r["size"] for r in rows}:
        mine = [r for r in rows if r["size"] == size]
        per_step[size] = {"stock_ms": sum(r["stock_us"] for r in mine) * BLOCKS_PER_STEP / 1000,
                          "fused_ms": sum(r["fused_us"] for r in mine) * BLOCKS_PER_STEP / 1000}
        print(f"  {size:>5} all of the above, per step: stock {per_step[size]['stock_ms']:.2f} ms, "
              f"fused {per_step[size]['fused_ms']:.2f} ms")
    result = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit(),
                       "torch": torch.__version__, "device": torch.cuda.get_device_name()},
              "rows": rows, "per_step": per_step}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
