"""Stage benchmark: plain diffusers against our path, per stage and per image, in one run on one device.

    python benchmarks/bench_stages.py --json bench.json                 # H200, model `random`
    python benchmarks/bench_stages.py --quick --sizes 512,1024 --skip-fp8
    python benchmarks/bench_stages.py --device cpu --model tiny --quick --sizes 512 --repeats 1   # smoke run

What is compared (median of N timed runs after warm-up, CUDA events, batch 1):
- text encoder, one ~256-token prompt: plain = the full Qwen3 model with `output_hidden_states`, padded
  to 512 tokens as diffusers' `ZImagePipeline._encode_prompt` does; ours = the encoder cut after the
  layer Z-Image reads, at the prompt's own length (`PromptEncoder`), then optionally compiled;
- one DiT step: diffusers' eager bf16 transformer; ours bf16 (real RoPE, fused projections,
  regional compile) and FP8 rowwise (the same, with torchao FP8 linears);
- 8 steps: `ZImagePipeline` with the embedding given and `output_type="latent"`; ours `DenoiseLoop`;
- VAE decode: `vae.decode` as the pipeline calls it; ours channels-last, optionally compiled, tiled
  above 1024x1024 (`VaeCodec`'s rule);
- per image in total: text + 8 steps + decode.
Also: the SDPA backends alone at the 1024x1024 sequence length, peak GPU memory per stage
(`max_memory_allocated` after a reset; `extra_gb` is the peak above what was resident before),
cold compile times, the relative error of each of our variants against plain, and for each DiT
figure its distance from the FLOP floor (2 x linear params x tokens + 4 x S^2 x dim attention per
block; bf16 at the 790 TFLOP/s measured in RESULTS.md's earlier round, FP8 linears at the nominal
1580); "% floor" in the table is floor / measured, 100% meaning at the floor. "plain/ours" above 1 means ours is faster.

Sections run from most to least important for the DiT and write the JSON after each, so that a
run cut short still leaves its data. `--budget-s` skips what would not fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.harness import Bench
from benchmarks.stages.attention import section_attention
from benchmarks.stages.dit import (
    DYNAMIC,
    dit_step_flops,
    floor_ms,
    section_dit_bf16,
    section_dit_fp8,
    section_dit_plain,
)
from benchmarks.stages.text_encoder import section_text
from benchmarks.stages.vae import section_vae, section_vae_compiled
from deployments.weights import loading
from deployments.denoiser.dit import rotary
from deployments.weights.model_source import resolve_model_source

# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------

PLAIN = {
    "text_encoder": "plain_full_pad512",
    "dit_step": "plain_bf16_eager",
    "dit_8steps": "plain_pipeline",
    "vae_decode": "plain",
    "total": "plain",
}


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with ratios (plain / ours) and, for the DiT, the FLOP floor; per-image totals appended."""
    rows = [dict(r) for r in results["rows"] if r["stage"] != "attention"]
    by_key = {(r["stage"], r["size"], r["variant"]): r for r in rows}

    # "ours" in the totals is what the stages run when configured as serve_config.yaml ships them.
    text = {v: by_key.get(("text_encoder", None, v))
            for v in ("plain_full_pad512", "ours_compiled_cuda_graphs", "ours_cuda_graphs", "ours_compiled",
                      "ours_truncated")}
    text_ours = next((r for v, r in text.items() if v != "plain_full_pad512" and r), None)
    sizes = sorted({r["size"] for r in rows if r["size"] is not None})
    for size in sizes:
        vae_plain = by_key.get(("vae_decode", size, "plain")) or by_key.get(("vae_decode", size, "plain_tiled"))
        vae_ours = by_key.get(("vae_decode", size, "ours_compiled")) or by_key.get(("vae_decode", size, "ours"))
        plain_parts = (text["plain_full_pad512"], by_key.get(("dit_8steps", size, "plain_pipeline")), vae_plain)
        if all(plain_parts):
            rows.append({"stage": "total", "size": size, "variant": "plain",
                         "median_ms": sum(p["median_ms"] for p in plain_parts)})
        for variant in ("ours_bf16", "ours_fp8", "ours_fp8_fused", "ours_fp8_fused_bf16attn"):
            parts = (text_ours, by_key.get(("dit_8steps", size, variant)), vae_ours)
            if all(parts):
                rows.append({"stage": "total", "size": size, "variant": variant,
                             "median_ms": sum(p["median_ms"] for p in parts)})
    by_key = {(r["stage"], r["size"], r["variant"]): r for r in rows}

    steps = results["meta"]["args"].get("steps", 8)
    for r in rows:
        plain = by_key.get((r["stage"], r["size"], PLAIN.get(r["stage"], "")))
        if plain is not None and plain is not r:
            r["plain_over_ours"] = plain["median_ms"] / r["median_ms"]
        flops, repeat = r, 1
        if r["stage"] == "dit_8steps":
            step_variant = "plain_bf16_eager" if r["variant"] == "plain_pipeline" else r["variant"]
            flops, repeat = by_key.get(("dit_step", r["size"], step_variant)) or {}, steps
        if flops.get("flops_linear") and results["meta"]["device"] != "cpu":
            parts = {"linear": repeat * flops["flops_linear"], "attention": repeat * flops["flops_attention"]}
            r["floor_ms"] = floor_ms(parts, fp8="fp8" in r["variant"])
            r["floor_share"] = r["floor_ms"] / r["median_ms"]
    return rows


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    return value


def print_table(results: dict[str, Any]) -> None:
    rows = summarize(results)
    meta = results["meta"]
    print()
    print(f"device {meta['device']} | torch {meta['torch']} | model {meta['model']} | {meta['dtype']} | "
          f"commit {meta['commit']} | {meta['date']}")
    header = f"{'stage':<13} {'size':>5} {'variant':<22} {'median ms':>10} {'plain/ours':>10} {'floor ms':>9} " \
             f"{'% floor':>8} {'peak GB':>8}"
    print(header)
    print("-" * len(header))
    order = ["text_encoder", "dit_step", "dit_8steps", "vae_decode", "total"]
    rows = sorted(rows, key=lambda r: (order.index(r["stage"]) if r["stage"] in order else 99, r["size"] or 0))
    for r in rows:
        ratio = f"{r['plain_over_ours']:.2f}x" if "plain_over_ours" in r else ""
        floor = f"{r['floor_ms']:.1f}" if "floor_ms" in r else ""
        share = f"{100 * r['floor_share']:.0f}%" if "floor_share" in r else ""
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") else ""
        print(f"{r['stage']:<13} {str(r['size'] or ''):>5} {r['variant']:<22} {r['median_ms']:>10.2f} {ratio:>10} "
              f"{floor:>9} {share:>8} {peak:>8}")
    attention = results.get("attention_per_layer", {}).get("backends", {})
    if attention:
        print("SDPA per layer at 1024x1024: " + ", ".join(
            f"{name.lower()} {t['median_ms']:.2f} ms ({t['tflops']:.0f} TFLOP/s)" for name, t in attention.items()))
    if results["compile"]:
        print("compile seconds: " + json.dumps(_rounded(results["compile"])))
    if results["accuracy"]:
        print("relative error vs plain: " + ", ".join(f"{k} {v:.2e}" for k, v in results["accuracy"].items()))
    for key in ("dit_bf16_weights_gb", "dit_fp8_weights_gb", "dit_fp8_load_peak_gb"):
        if key in results:
            print(f"{key}: {results[key]:.2f}")
    for text in results["notes"]:
        print(f"note: {text}")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="random", help="random (full size, GPU), tiny, or a checkpoint directory")
    p.add_argument("--sizes", default="512,1024,2048", help="square sizes in pixels, comma separated")
    p.add_argument("--full-max", type=int, default=1024, help="run the 8-step loops only up to this size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--caption-tokens", type=int, default=160, help="caption length for the DiT")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length for the text encoder")
    p.add_argument("--repeats", type=int, default=0, help="timed runs per figure (default 5, 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer repeats, no cache-restart measurement")
    p.add_argument("--skip-fp8", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="our path eager (real RoPE, fusion, FP8 still on)")
    p.add_argument("--skip-text", action="store_true")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--attention", default="cudnn", choices=sorted(rotary.ATTENTION_BACKENDS))
    p.add_argument("--vae-tile-px", type=int, default=1280, help="VAE tile side above the tiling threshold")
    p.add_argument("--vae-tile-overlap", type=float, default=0.2)
    p.add_argument("--vae-channels-last", action="store_true", help="compiled VAE in channels-last layout")
    p.add_argument("--dynamic", default="marked", choices=sorted(DYNAMIC),
                   help="DiT shapes: batch and sequence dims marked dynamic, dynamo's automatic, or static")
    p.add_argument("--fp8-kernels", default="inductor",
                   help="FP8 variants to run, comma separated: inductor (torchao + inductor), fused (our Triton "
                        "kernels + cuDNN FP8 attention), fused-bf16-attention")
    p.add_argument("--fp8-tune", action="store_true", help="let torchao turn on coordinate-descent tuning")
    p.add_argument("--dit-cuda-graphs", action="store_true",
                   help="also time each FP8 variant's step and 8 steps replayed from CUDA graphs (dit_cuda_graphs)")
    p.add_argument("--compile-backend", default=None, help="default inductor on CUDA, eager on the CPU smoke run")
    p.add_argument("--cache-dir", default=None, help="compile cache directory (default: a fresh one, so cold)")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip later sections past this many seconds")
    p.add_argument("--json", default=None,
                   help="write results here, after every section (default: a timestamped file in the temp dir)")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    args.dit_sizes = list(args.sizes)
    args.full_sizes = [s for s in args.sizes if s <= args.full_max]
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="zimage-compile-")
    if args.json is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        args.json = str(Path(tempfile.gettempdir()) / f"zimage-bench-stages-{stamp}.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --model tiny for a smoke run", file=sys.stderr)
        return 2
    bench = Bench(args, summarize)
    source = resolve_model_source(args.model)
    state: dict[str, Any] = {}
    print(f"bench: {bench.results['meta']['device']}, sizes {args.sizes}, repeats {bench.repeats}, "
          f"compile backend {bench.backend}, cache {args.cache_dir}", flush=True)

    vae = loading.load_vae(source, bench.device, bench.dtype)
    from diffusers import ZImageTransformer2DModel

    cfg = ZImageTransformer2DModel.load_config(source.location, subfolder="transformer") if not source.is_random \
        else None
    if cfg is None:
        from deployments.weights.random_model import FULL_TRANSFORMER_CONFIG

        cfg = dict(FULL_TRANSFORMER_CONFIG)
    dit_cfg = argparse.Namespace(**{k: v for k, v in dict(cfg).items() if not k.startswith("_")})
    bench.results["dit_flops_per_step"] = {
        size: dit_step_flops(dit_cfg, size, size, args.caption_tokens) for size in args.dit_sizes
    }

    sections: list[tuple[str, float, Callable[[], None]]] = [
        ("attention", 10, lambda: section_attention(bench, dit_cfg)),
        ("dit_plain", 30, lambda: section_dit_plain(bench, source, vae, state)),
        ("vae", 20, (lambda: None) if args.skip_vae else (lambda: section_vae(bench, vae))),
        ("text", 20, (lambda: None) if args.skip_text else (lambda: section_text(bench, source))),
        ("dit_bf16", 30, lambda: section_dit_bf16(bench, source, state)),
        ("dit_fp8", 60, (lambda: None) if args.skip_fp8 else (lambda: section_dit_fp8(bench, source, state))),
        ("vae_compiled", 60, (lambda: None) if args.skip_vae else (lambda: section_vae_compiled(bench, vae))),
    ]
    status = 0
    for name, needs_s, run in sections:
        if bench.remaining() < needs_s:
            bench.note(f"section {name} skipped: {bench.remaining():.0f} s of the budget left")
            continue
        print(f"[{bench.elapsed():6.1f} s] {name}", flush=True)
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - record and go on: later sections still give data
            status = 1
            bench.note(f"section {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            traceback.print_exc()
            bench.free()
        bench.results.setdefault("sections_done", []).append(name)
        bench.write()
    bench.write()
    print_table(bench.results)
    print(f"\nwrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())

