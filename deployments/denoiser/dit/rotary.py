"""Real-valued RoPE for the DiT.

diffusers applies RoPE with complex tensors; inductor cannot generate complex code, so regional
compilation of the stock blocks never finished. `install_real_rope` swaps the rotary tables for real
`[..., D/2, 2]` (cos, sin) tables and the attention processor for one doing the rotation in real
float32 arithmetic: the same numbers, no complex tensor anywhere in a block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from deployments.denoiser.dit.blocks import iter_blocks

AttentionChoice = Literal["auto", "cudnn", "flash", "efficient", "math"]

ATTENTION_BACKENDS: dict[str, list[SDPBackend] | None] = {
    "auto": None,  # torch's own order (flash first, cuDNN last in torch 2.13)
    "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}


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
        out = self.attend(attn, query, key, value, attention_mask, freqs_cis)

        output = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)
        return output

    def attend(
        self,
        attn: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention on projected `[B, S, heads * head_dim]` q, k, v: per-head norms, RoPE, SDPA;
        returns `[B, S, heads * head_dim]` in the projections' dtype (the fused FP8 block's masked
        path calls this too)."""
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
        return out.transpose(1, 2).flatten(2, 3).to(dtype)


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
