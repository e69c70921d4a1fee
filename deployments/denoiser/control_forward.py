"""The ControlNet's forward on the DiT's own tokens: what diffusers' `ZImageControlNetModel.forward`
computes, without making again what the DiT's forward of the same step has made.

diffusers' ControlNet embeds the timestep and the image, runs the DiT's noise and caption refiners
itself (about 3.5 of the 36 TFLOP a Union 2.1 ControlNet adds at 1024x1024) and stacks every earlier
hint at each control block (`torch.stack(all_c)`: O(n^2) copies of `[B, S, D]`, about 15 GB of memory
traffic per 1024x1024 step). Here, on the DiT's `dit.forward.Tokens` for the controlled rows:

- the timestep embedding, the embedded image tokens and the refined caption tokens are the DiT's;
- the control context is embedded as diffusers does (patchified, the image's pad rows set to the
  DiT's pad token);
- Union 2.x: the control refiner (its own blocks, 2.1; the control layers, 2.0) runs over the image
  tokens, then the noise refiner runs again with its hints added (so its output is not the DiT's, and
  that pass stays); Union 1.0: the control refiner runs on the control stream alone and the DiT's
  refined image tokens are used as they are;
- each control block is a DiT block between two projections (`control_blocks`): the first of a list
  `c = before_proj(c) + x`, then `c = block(c)`, `hint = after_proj(c) * scale`; the hints go to a
  list, and only those some layer takes get their projection (Union 2.0's refiner pass uses 2 of 15).

The result is `Hints`: one `[n, S, D]` tensor per main layer named by `control_layers_places`, over the
controlled rows, which `Hints.add` adds after that layer; the other rows are left as they are (diffusers
adds them zeros). A row's scale (`[n, 1, 1]`) weights its hints where diffusers takes one float.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from deployments.denoiser.dit.forward import FRAME_PATCH, PATCH, Tokens


@dataclass
class Hints:
    """`by_layer[i]`: the hints added after main layer i, for the controlled `rows` (None: every row)."""

    by_layer: dict[int, torch.Tensor]
    rows: torch.Tensor | None

    def add(self, layer: int, unified: torch.Tensor) -> torch.Tensor:
        hint = self.by_layer.get(layer)
        if hint is None:
            return unified
        if self.rows is None:
            return unified + hint
        unified[self.rows, : hint.shape[1]] += hint  # the controlled rows, over their own length
        return unified


def hints(controlnet: nn.Module, transformer: nn.Module, made: Tokens, contexts: list[torch.Tensor],
          scales: torch.Tensor, rows: tuple[int, ...] | None = None) -> Hints:
    """The ControlNet's hints for `rows` of the forward whose tokens are `made` (see the module docstring);
    `contexts[j]` `[C_in, 1, h, w]` and `scales[j]` are row `rows[j]`'s."""
    sub = made if rows is None else made.rows(rows)
    c = _embed(controlnet, transformer, contexts, sub)
    mode = controlnet.config.add_control_noise_refiner
    image = sub.refined
    if mode is None:  # Union 1.0: plain DiT blocks on the control stream, modulated
        for block in controlnet.control_noise_refiner:
            c = block(c, sub.image_mask, sub.image_freqs, sub.adaln)
    else:
        blocks = controlnet.control_layers if mode == "control_layers" else controlnet.control_noise_refiner
        places = controlnet.config.control_refiner_layers_places or []
        c, skips = _run(blocks, c, sub.image, sub.image_mask, sub.image_freqs, sub.adaln, scales, len(places))
        with _adapters_of(transformer, rows, len(made.image_lens)):
            image = _refine(transformer, sub, dict(zip(places, skips)))
    unified, freqs, mask = sub.joint(transformer, image)
    c_unified, _, _ = sub.joint(transformer, c)
    places = controlnet.config.control_layers_places
    _, skips = _run(controlnet.control_layers, c_unified, unified, mask, freqs, sub.adaln, scales, len(places))
    index = None if rows is None else torch.tensor(list(rows), dtype=torch.int64, device=unified.device)
    return Hints(dict(zip(places, skips)), index)


def _embed(controlnet: nn.Module, transformer: nn.Module, contexts: list[torch.Tensor], sub: Tokens) -> torch.Tensor:
    """The control contexts as `[n, L, D]` tokens at the image tokens' places (diffusers' ControlNet)."""
    patches = controlnet.patchify(contexts, PATCH, FRAME_PATCH)
    c = controlnet.control_all_x_embedder[f"{PATCH}-{FRAME_PATCH}"](torch.cat(patches, dim=0))
    c = torch.where(torch.cat(sub.image_pad).unsqueeze(-1), transformer.x_pad_token, c)
    return pad_sequence(list(c.split(sub.image_lens, dim=0)), batch_first=True, padding_value=0.0)


def _run(blocks, c: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor,
         adaln: torch.Tensor, scales: torch.Tensor, wanted: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Control blocks over the stream `c` beside the tokens `x`: the last `c` and the first `wanted`
    hints (scaled), as diffusers' `ZImageControlTransformerBlock`s compute them."""
    skips: list[torch.Tensor] = []
    for block in blocks:
        if block.block_id == 0:
            c = block.before_proj(c) + x
            skips = []
        c = block(c, mask, freqs, adaln)
        if len(skips) < wanted:
            skips.append(block.after_proj(c) * scales)
    return c, skips


def _refine(transformer: nn.Module, sub: Tokens, hints: dict[int, torch.Tensor]) -> torch.Tensor:
    """The DiT's noise refiner over the image tokens with the control refiner's hints added after its layers."""
    x = sub.image
    for i, layer in enumerate(transformer.noise_refiner):
        x = layer(x, sub.image_mask, sub.image_freqs, sub.adaln, None, None, None)
        if i in hints:
            x = x + hints[i]
    return x


def _adapters_of(transformer: nn.Module, rows: tuple[int, ...] | None, batch: int):
    """The noise refiner runs again over the controlled rows only: with LoRA adapters in the forward
    (`lora.slots`), those rows' adapters, not the whole batch's."""
    slots = getattr(transformer, "_lora_slots", None)
    if slots is None or slots.active is None or rows is None:
        return contextlib.nullcontext()
    return slots.applied(slots.active.rows(rows))
