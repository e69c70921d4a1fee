"""A faster Z-Image DiT: real-valued RoPE, fused projections, FP8 linears and regional compilation.

Every function here rewrites a loaded `ZImageTransformer2DModel` in place and keeps its call
signature, so `DenoiseLoop` (and diffusers' own pipeline) call the optimized module exactly as before.

Why each piece exists (one H200, 1024x1024, one DiT step; see shared/gpu/MEASURED.md):
- diffusers applies RoPE with complex tensors; inductor cannot generate complex code, so regional
  compilation of the stock blocks never finished. `install_real_rope` swaps the rotary tables for
  real `[..., D/2, 2]` (cos, sin) tables and the attention processor for one doing the rotation in
  real float32 arithmetic: the same numbers, no complex tensor anywhere in a block.
- `fuse_projections` merges q/k/v into one GEMM and the SwiGLU's w1/w3 into another: fewer, larger
  matrix products (better wave occupancy) and, with FP8, one activation quantization instead of three
  (or two).
- `quantize_fp8` turns the block linears (about 85% of a step's FLOPs at 1024x1024; attention is
  the rest and stays bf16) into torchao FP8 rowwise dynamic GEMMs; eager FP8 is slower than bf16
  (the quantization kernels are not fused), so FP8 is meant to be used with `compile_blocks`.
- `compile_blocks` compiles the 34 repeated blocks once (they share one graph), with inductor's
  caches on a chosen directory so that other processes on the node start warm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

Precision = Literal["bf16", "fp8"]
Fp8Scaling = Literal["row", "tensor"]
AttentionChoice = Literal["auto", "cudnn", "flash", "efficient", "math"]

BLOCK_LISTS = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")
FP8_MIN_CAPABILITY = (8, 9)
FP8_ROW_AMAX_FLOOR = 1e-12
# Names of the block linears that FP8 rewrites, relative to a block.
_BLOCK_LINEAR = re.compile(
    r"^(?:noise_refiner|context_refiner|siglip_refiner|layers)\.\d+\."
    r"(?:attention\.(?:to_q|to_k|to_v|to_qkv|to_out\.0)|feed_forward\.(?:w1|w2|w3|w13))$"
)

ATTENTION_BACKENDS: dict[str, list[SDPBackend] | None] = {
    "auto": None,  # torch's own order (flash first, cuDNN last in torch 2.13)
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}


# --------------------------------------------------------------------------------------------------
# Real-valued RoPE
# --------------------------------------------------------------------------------------------------


def rope_cos_sin(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each `[B, S, 1, D/2]` float32, from complex `[B, S, D/2]` or real `[B, S, D/2, 2]` tables.

    `is_complex()` is a dtype check, static under tracing: no data-dependent control flow.
    """
    if freqs_cis.is_complex():
        cos, sin = freqs_cis.real, freqs_cis.imag
    else:
        cos, sin = freqs_cis[..., 0], freqs_cis[..., 1]
    return cos.float().unsqueeze(2), sin.float().unsqueeze(2)


def apply_real_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates adjacent pairs `(x[..., 0::2], x[..., 1::2])` as `view_as_complex(x) * freqs` does, in float32.

    `x` is `[B, S, H, D]`; `cos`, `sin` broadcast to `[B, S, H, D/2]`. Returns `x`'s dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RealRopeEmbedder:
    """Stands in for the model's `RopeEmbedder`: the same table lookups, returned as real `[N, D/2, 2]`.

    The tables are diffusers' own complex64 tables viewed as (cos, sin) pairs, so the values are
    bit-identical; the model's `_prepare_sequence` / `_build_unified_sequence` pad and concatenate
    them like the complex ones (zero padding is (cos, sin) = (0, 0) either way).
    """

    def __init__(self, theta: float, axes_dims: Sequence[int], axes_lens: Sequence[int]):
        self.theta = theta
        self.axes_dims = list(axes_dims)
        self.axes_lens = list(axes_lens)
        self._tables: list[torch.Tensor] | None = None

    @classmethod
    def from_embedder(cls, embedder: Any) -> RealRopeEmbedder:
        if isinstance(embedder, RealRopeEmbedder):
            return embedder
        return cls(embedder.theta, embedder.axes_dims, embedder.axes_lens)

    def tables(self, device: torch.device) -> list[torch.Tensor]:
        if self._tables is None or self._tables[0].device != device:
            from diffusers.models.transformers.transformer_z_image import RopeEmbedder

            complex_tables = RopeEmbedder.precompute_freqs_cis(self.axes_dims, self.axes_lens, theta=self.theta)
            self._tables = [torch.view_as_real(t).contiguous().to(device) for t in complex_tables]
        return self._tables

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[-1] != len(self.axes_dims):
            raise ValueError(f"position ids must be [N, {len(self.axes_dims)}], got {tuple(ids.shape)}")
        tables = self.tables(ids.device)
        return torch.cat([tables[axis][ids[:, axis]] for axis in range(len(tables))], dim=-2)


class RealRopeAttnProcessor:
    """Drop-in for diffusers' `ZSingleStreamAttnProcessor` without complex numbers.

    Computes the same function: q/k/v projections (or one fused `to_qkv`), per-head RMS norms, RoPE
    in float32 then cast back, SDPA over `[B, H, S, D]`, output projection. With no mask it passes
    none, so SDPA may pick flash or cuDNN attention; a `[B, S]` key-padding mask (True = real token)
    broadcasts as `[B, 1, 1, S]`. `backends`, when given, is the SDPA backend priority for this
    call (a `sdpa_kernel` context that dynamo records in the graph).

    Share one instance between blocks: a regional compile then sees identical blocks.
    """

    def __init__(self, backends: Sequence[SDPBackend] | None = None):
        self.backends = list(backends) if backends else None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if getattr(attn, "to_qkv", None) is not None:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            cos, sin = rope_cos_sin(freqs_cis)
            query = apply_real_rope(query, cos, sin)
            key = apply_real_rope(key, cos, sin)
        dtype = query.dtype

        mask = attention_mask
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.backends is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        else:
            with sdpa_kernel(self.backends, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(dtype)

        output = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output


def iter_blocks(transformer: nn.Module) -> Iterator[nn.Module]:
    """The repeated transformer blocks, refiners first, in execution order."""
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name, None)
        if blocks is not None:
            yield from blocks


def install_real_rope(transformer: nn.Module, attention: AttentionChoice = "auto") -> nn.Module:
    """Real rotary tables plus `RealRopeAttnProcessor` on every block's attention (one shared instance)."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    transformer.rope_embedder = RealRopeEmbedder.from_embedder(transformer.rope_embedder)
    processor = RealRopeAttnProcessor(ATTENTION_BACKENDS[attention])
    count = 0
    for block in iter_blocks(transformer):
        block.attention.set_processor(processor)
        count += 1
    if count == 0:
        raise ValueError(f"{type(transformer).__name__} has no transformer blocks to patch")
    return transformer


# --------------------------------------------------------------------------------------------------
# Fused projections
# --------------------------------------------------------------------------------------------------


class FusedFeedForward(nn.Module):
    """SwiGLU with w1 and w3 in one `[2 * hidden, dim]` weight: `w2(silu(x w1) * (x w3))`."""

    def __init__(self, w13: nn.Linear, w2: nn.Linear):
        super().__init__()
        self.w13 = w13
        self.w2 = w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x3 = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(x1) * x3)


def _concat_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears], dim=0))
        if has_bias:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears], dim=0))
    return fused.requires_grad_(False)


def fuse_projections(transformer: nn.Module) -> nn.Module:
    """Merges q/k/v into `to_qkv` and w1/w3 into `w13` in every block, freeing the originals.

    Must run before `quantize_fp8` (the fused weights are what gets quantized) and needs
    `RealRopeAttnProcessor` (diffusers' processor reads `to_q`/`to_k`/`to_v`).
    """
    for block in iter_blocks(transformer):
        attn = block.attention
        if getattr(attn, "to_qkv", None) is None:
            attn.to_qkv = _concat_linears([attn.to_q, attn.to_k, attn.to_v])
            del attn.to_q, attn.to_k, attn.to_v
            attn.fused_projections = True
        ff = block.feed_forward
        if not isinstance(ff, FusedFeedForward):
            block.feed_forward = FusedFeedForward(_concat_linears([ff.w1, ff.w3]), ff.w2)
    return transformer


# --------------------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------------------


class Fp8UnsupportedError(RuntimeError):
    """FP8 GEMMs need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""


def check_fp8_support(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise Fp8UnsupportedError(
            f"precision 'fp8' needs the transformer on a CUDA GPU with compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (H100/H200, L40S, RTX 40xx); it is on "
            f"{device.type!r}{'' if torch.cuda.is_available() else ' and no CUDA device is visible'}. "
            "Use precision 'bf16'."
        )
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise Fp8UnsupportedError(
            f"precision 'fp8' needs compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. Use precision 'bf16'."
        )


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """The big linears inside the repeated blocks; embedders, adaLN and the final layer stay bf16."""
    return isinstance(module, nn.Linear) and _BLOCK_LINEAR.match(fqn) is not None


def quantize_fp8(transformer: nn.Module, *, tune_inductor: bool = False, scaling: Fp8Scaling = "row") -> nn.Module:
    """torchao FP8 (e4m3) with dynamic activation scales: `scaling="row"` scales per token (activations)
    and per output channel (weights); `"tensor"` uses one scale per tensor (cuBLAS's plain FP8 GEMM,
    coarser where one token has outliers).

    Only the block linears (attention q/k/v/out, feed-forward w1/w2/w3, or their fused forms);
    timestep, caption and patch embedders, adaLN modulation and the final layer keep bf16.
    `tune_inductor` lets torchao switch on inductor's coordinate-descent tuning, which adds
    minutes of compile time for a few percent; it is off by default.
    """
    device = next(transformer.parameters()).device
    check_fp8_support(device)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    targets = [(name, mod) for name, mod in transformer.named_modules() if is_block_linear(mod, name)]
    if not targets:
        raise ValueError(f"{type(transformer).__name__} has no block linears to quantize")
    wrong = sorted({str(mod.weight.dtype) for _, mod in targets if mod.weight.dtype != torch.bfloat16})
    if wrong:
        raise ValueError(f"FP8 rowwise quantization needs bfloat16 weights; the block linears are {', '.join(wrong)}")
    # A floor under each row's absolute maximum: an all-zero row (padding in a ragged batch, or a
    # zero pad token) would otherwise get scale 0 and turn into NaN, which attention then spreads to
    # every real token through the masked columns (0 x NaN = NaN).
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if scaling == "row" else PerTensor(),
        set_inductor_config=tune_inductor,
        activation_value_lb=FP8_ROW_AMAX_FLOOR,
    )
    quantize_(transformer, config, filter_fn=is_block_linear)
    logger.info("FP8 (%s scaling): %d block linears quantized", scaling, len(targets))
    return transformer


# --------------------------------------------------------------------------------------------------
# Compilation and its caches
# --------------------------------------------------------------------------------------------------


def configure_compile_cache(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """Points inductor's and Triton's on-disk caches at `cache_dir` and switches every cache on.

    Caches (all keyed by graph, torch version and device, so sharing a directory is safe):
    FX graph cache (compiled graphs), AOTAutograd cache (the traced joint graph), local autotune
    cache, Triton kernel binaries. A second process with the same directory skips most of inductor's
    and Triton's work and pays mostly for dynamo tracing. Call before anything is compiled.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir).expanduser().resolve()
        (path / "inductor").mkdir(parents=True, exist_ok=True)
        (path / "triton").mkdir(parents=True, exist_ok=True)
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
        if previous and previous != os.environ["TORCHINDUCTOR_CACHE_DIR"]:
            try:
                from torch._inductor.utils import clear_caches

                clear_caches()  # drop in-memory directory lookups made under the old path
            except ImportError:
                pass
    inductor_config = torch._inductor.config
    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    functorch_config = getattr(torch._functorch, "config", None)
    if functorch_config is not None and hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    return path


def _artifact_file(cache_dir: str | os.PathLike[str], name: str) -> Path:
    device = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    tag = re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{name}-torch{torch.__version__}-{device}")
    return Path(cache_dir).expanduser() / "mega" / f"{tag}.bin"


def load_compile_artifacts(cache_dir: str | os.PathLike[str] | None, name: str = "dit") -> bool:
    """Loads a mega-cache file written by `save_compile_artifacts` into the local caches.

    One file holds everything a warm-up compiled; copying it to a fresh node (or a shared path)
    gives that node warm caches without sharing the whole cache directory.
    """
    if cache_dir is None or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    file = _artifact_file(cache_dir, name)
    if not file.is_file():
        return False
    try:
        info = torch.compiler.load_cache_artifacts(file.read_bytes())
    except Exception as exc:  # a stale or foreign file must never stop start-up
        logger.warning("ignoring compile artifacts %s: %s", file, exc)
        return False
    logger.info("loaded compile artifacts from %s: %s", file, info)
    return info is not None


def save_compile_artifacts(cache_dir: str | os.PathLike[str] | None, name: str = "dit") -> Path | None:
    """Writes everything compiled so far in this process to one file (atomic replace)."""
    if cache_dir is None or not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    try:
        result = torch.compiler.save_cache_artifacts()
    except Exception as exc:
        logger.warning("could not serialize compile artifacts: %s", exc)
        return None
    if not result:
        return None
    data, _info = result
    file = _artifact_file(cache_dir, name)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, file)
    return file


def _raise_recompile_limit(limit: int = 64) -> None:
    config = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, attr) and getattr(config, attr) < limit:
            setattr(config, attr, limit)


# Block inputs whose batch (0) and sequence (1) dimensions vary between calls.
_DYNAMIC_DIMS: dict[str, tuple[int, ...]] = {
    "x": (0, 1),
    "attn_mask": (0, 1),
    "freqs_cis": (0, 1),
    "adaln_input": (0,),
    "noise_mask": (0, 1),
    "adaln_noisy": (0,),
    "adaln_clean": (0,),
}


def _mark_dynamic(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        torch._dynamo.maybe_mark_dynamic(value, list(_DYNAMIC_DIMS[name]))


def _marked_forward(block: nn.Module, compiled: Any) -> Any:
    """An eager `forward` for one block: marks the batch and sequence dims, then calls the shared graph."""

    def forward(
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        freqs_cis: torch.Tensor,
        adaln_input: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
        adaln_noisy: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not freqs_cis.is_contiguous():
            # diffusers slices the padded rotary table for some batches: another stride, which would
            # be another graph (compiled on a live request) for the same shapes.
            freqs_cis = freqs_cis.contiguous()
        args = (x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
        for name, value in zip(_DYNAMIC_DIMS, args):
            _mark_dynamic(name, value)
        return compiled(block, *args)

    return forward


def compile_blocks(
    transformer: nn.Module,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    dynamic: bool | None = True,
    fullgraph: bool = True,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    artifacts_name: str = "dit",
) -> nn.Module:
    """Regional compilation: every repeated block runs one shared compiled graph (per input variant).

    Dynamic shapes, `dynamic=True` (default): the sequence length changes with the image size and the
    caption length (padded to multiples of 32, so up to 16 buckets at a 512-token cap), and the
    refiners and the main layers see different lengths; static shapes would recompile per
    (size, caption bucket) and soon hit dynamo's recompile limit, silently falling back to eager.
    So exactly the batch and sequence dimensions of the block inputs are marked dynamic before each
    call; all other dims stay static. (`torch.compile(dynamic=True)` would also make the rotary
    table's trailing 2 and 64 symbolic and, by duck sizing, tie them to an equal batch size, which
    recompiles on the next batch size.) The GEMMs and attention are library kernels that do not care;
    only the fused element-wise and norm kernels are generated for a symbolic length. Graph variants
    that remain: batch 1 vs more (size-1 dims are specialized), no mask vs a ragged-batch mask,
    modulated blocks vs the context refiner: at most 6, compiled up front by `warmup`.
    `dynamic=False` compiles static shapes (one graph per shape), `None` leaves it to dynamo's
    automatic dynamic shapes (static first, dynamic on the first change).
    """
    configure_compile_cache(cache_dir)
    load_compile_artifacts(cache_dir, artifacts_name)
    _raise_recompile_limit()
    options: dict[str, Any] = {"fullgraph": fullgraph, "backend": backend}
    if mode is not None:
        options["mode"] = mode
    names = set(getattr(transformer, "_repeated_blocks", None) or ["ZImageTransformerBlock"])
    blocks = [module for module in transformer.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no repeated blocks ({', '.join(sorted(names))})")
    compiled_by_class: dict[type, Any] = {}
    for block in blocks:
        block.__dict__.pop("forward", None)  # a previous compile_blocks' wrapper
        if dynamic is True:
            cls = type(block)
            if cls not in compiled_by_class:
                compiled_by_class[cls] = torch.compile(cls.forward, dynamic=None, **options)
            block.forward = _marked_forward(block, compiled_by_class[cls])
        else:
            block.compile(dynamic=dynamic, **options)
    transformer._compile_artifacts = (cache_dir, artifacts_name)
    return transformer


def _model_device_dtype(transformer: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = transformer.x_pad_token
    return param.device, param.dtype


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@torch.inference_mode()
def warmup(
    transformer: nn.Module,
    sizes: Iterable[int | tuple[int, int]],
    caption_len: int = 160,
    *,
    batch_sizes: Sequence[int] = (1,),
    ragged: bool = True,
    caption_buckets: Sequence[int] = (),
    save_artifacts: bool = True,
) -> dict[str, float]:
    """Runs one forward per size (width, height in pixels, or one int for a square) on random inputs.

    Compiles every graph a request will need, so no request pays for compilation: for each batch
    size over 1 it also runs equal caption lengths (no mask) and, with `ragged`, unequal ones (the
    masked graph). Runs under `inference_mode`, as the denoise loop does (a different grad mode
    would be a different graph). `caption_buckets` (padded caption lengths) are run once each at
    batch 1: the graphs are shared, but cuDNN plans its attention per shape (tens of ms each,
    twice per forward: the caption refiner and the main layers), which a single request with a new
    caption length would otherwise pay; they run one token short of the bucket, so the graph of a
    caption the model pads (a first request compiled one, measured) is compiled here too. Returns
    seconds per call, keyed `WxH/bN[/ragged|/capL]`. When `compile_blocks` was given a cache directory, also writes the mega-cache file there
    (`save_artifacts`), so a fresh node can start from that one file.
    """
    from deployments.core.denoising import latent_shape

    device, dtype = _model_device_dtype(transformer)
    channels = transformer.config.in_channels
    cap_dim = transformer.config.cap_feat_dim
    generator = torch.Generator("cpu").manual_seed(0)
    timings: dict[str, float] = {}

    def run(key: str, width: int, height: int, cap_lens: list[int]) -> None:
        shape = latent_shape(channels, width, height)
        latents = [
            torch.randn(shape, generator=generator).to(device, dtype).unsqueeze(2)[0] for _ in cap_lens
        ]
        captions = [torch.randn(n, cap_dim, generator=generator).to(device, dtype) for n in cap_lens]
        t = torch.full((len(cap_lens),), 0.5, device=device)
        _sync(device)
        start = time.perf_counter()
        transformer(latents, t, captions, return_dict=False)
        _sync(device)
        timings[key] = time.perf_counter() - start

    for size in sizes:
        width, height = _as_size(size)
        for batch in batch_sizes:
            run(f"{width}x{height}/b{batch}", width, height, [caption_len] * batch)
            if batch == 1:
                for length in caption_buckets:  # one token short: the model pads it, as most captions
                    run(f"{width}x{height}/b1/cap{length}", width, height, [max(1, length - 1)])
            if batch > 1 and ragged:
                lens = [max(1, caption_len - 33 * (i % 2)) for i in range(batch)]
                run(f"{width}x{height}/b{batch}/ragged", width, height, lens)
    cache_dir, artifacts_name = getattr(transformer, "_compile_artifacts", (None, "dit"))
    if save_artifacts and cache_dir is not None:
        save_compile_artifacts(cache_dir, artifacts_name)
    return timings


def warm_for_serving(
    transformer: nn.Module, sizes: Iterable[int | tuple[int, int]], max_batch_size: int, max_caption_tokens: int
) -> dict[str, float]:
    """The warm-up a serving replica runs before it reports ready (`warmup` with these choices).

    Batch sizes 1, 2 and the largest: two sizes over 1 make sure the graph for batches over 1 is the
    dynamic one (a first compile may specialize on the batch size it saw, and the next batch size
    would then stall a live request for a recompile). Every caption bucket the DiT pads to, up to
    `max_caption_tokens`, at batch 1 (cuDNN's attention plans; padded captions' graph).
    """
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    batch_sizes = sorted({1, min(2, max_batch_size), max_batch_size})
    buckets = range(SEQ_MULTI_OF, max_caption_tokens + 1, SEQ_MULTI_OF)
    return warmup(transformer, sizes, batch_sizes=batch_sizes, caption_buckets=buckets)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------


def optimize_transformer(
    transformer: nn.Module,
    precision: Precision = "bf16",
    compile: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    fuse: bool = True,
    attention: AttentionChoice = "auto",
    dynamic: bool | None = True,
    tune_inductor: bool = False,
    fp8_scaling: Fp8Scaling = "row",
    backend: str | Callable[..., Any] = "inductor",
) -> nn.Module:
    """Real RoPE, then (optionally) fused projections, then FP8, then regional compile; in place.

    The order matters: the real-valued processor must be in place before fusion (diffusers' reads
    the unfused projections) and before compiling (complex RoPE does not compile); fusion before FP8
    so that the fused weights are quantized; FP8 before compiling so the graphs trace the FP8 GEMMs.
    `precision="bf16"` keeps the weights in the dtype they were loaded in (bf16 in production,
    float32 in CPU tests). Returns the same module, still called as diffusers calls it.
    """
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if precision == "fp8":  # fail before touching the module
        check_fp8_support(_model_device_dtype(transformer)[0])
    install_real_rope(transformer, attention)
    if fuse:
        fuse_projections(transformer)
    if precision == "fp8":
        quantize_fp8(transformer, tune_inductor=tune_inductor, scaling=fp8_scaling)
    if compile:
        compile_blocks(transformer, cache_dir, dynamic=dynamic, backend=backend, artifacts_name=f"dit-{precision}")
    return transformer


class StaticOrDynamicDecoder:
    """The VAE decoder compiled twice: a static-shape graph per shape seen while `recording_static()`
    (the warm-up sizes and their tiles), and one graph dynamic in height and width for every other size.

    Measured on an H200 at 1024x1024: the static graph decodes in 36 ms, the dynamic one in 45 ms;
    but static graphs alone would compile (30 s or more) on the first request of every new size.
    Two separate top-level functions keep the two sets of graphs apart in dynamo's cache.
    """

    def __init__(self, forward: Callable[..., Any], backend: str = "inductor"):
        def static_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return forward(z, *args, **kwargs)

        def dynamic_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return forward(z, *args, **kwargs)

        self._static = torch.compile(static_decode, dynamic=False, backend=backend)
        self._dynamic = torch.compile(dynamic_decode, dynamic=None, backend=backend)
        self.static_shapes: set[tuple[int, ...]] = set()
        self._recording = False

    def __call__(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shape = tuple(z.shape)
        if self._recording:
            self.static_shapes.add(shape)
        if shape in self.static_shapes:
            return self._static(z, *args, **kwargs)
        torch._dynamo.maybe_mark_dynamic(z, [2, 3])
        return self._dynamic(z, *args, **kwargs)

    @contextlib.contextmanager
    def recording_static(self) -> Iterator[None]:
        """Shapes decoded inside get static graphs from now on."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False


def optimize_vae(
    vae: nn.Module, compile: bool = False, channels_last: bool = True, *, backend: str = "inductor"
) -> nn.Module:
    """Channels-last memory (cuDNN's preferred convolution layout on tensor cores) and optional compile.

    Compiling fuses GroupNorm + SiLU + residual adds, where the decoder spends much of its time at
    high resolution. The decoder becomes a `StaticOrDynamicDecoder` (`vae.decoder.forward`): sizes
    decoded under its `recording_static()` run static graphs, every other size one dynamic graph.
    The encoder (edits only) is left to dynamo's automatic dynamic shapes.
    """
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    if compile:
        _raise_recompile_limit()
        vae.decoder.forward = StaticOrDynamicDecoder(type(vae.decoder).forward.__get__(vae.decoder), backend)
        if getattr(vae, "encoder", None) is not None:
            vae.encoder.compile(dynamic=None, backend=backend)
    return vae


def optimize_text_encoder(encoder: nn.Module, compile: bool = False, *, backend: str = "inductor") -> nn.Module:
    """Optional regional compile of the Qwen3 decoder layers, dynamic in the sequence length.

    Prompts vary in length token by token. Dynamo's automatic dynamic shapes compile the first
    length statically and, on the first different length, one graph with a symbolic length (only
    the dims that changed become symbolic; `dynamic=True` would also make the head and rotary dims
    symbolic). Compiling the layers, not the whole model, keeps the mask construction eager and the
    compile short.
    """
    if compile:
        _raise_recompile_limit()
        for layer in encoder.layers:
            layer.compile(dynamic=None, backend=backend)
    return encoder
