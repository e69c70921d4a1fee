"""The DiT's forward (diffusers' `ZImageTransformer2DModel.forward`, one image per item) cut at its main
layers, for a controlled forward: a ControlNet reads the tokens the DiT has made before them instead
of making them again (`denoiser.control_forward`), and its hints are added after the main layers it
names, as diffusers adds `controlnet_block_samples`.

The same calls in the same order on the same modules as diffusers' forward (its patchify, its
sequence builders, the blocks as they run: compiled, fused, with the caption pad masks of
`caption_buckets`), so without hints it computes diffusers' function bit for bit on one device
(tests/unit/test_controlnet_forward.py). Plain forwards keep calling diffusers' forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

PATCH, FRAME_PATCH = 2, 1
EMBEDDER = f"{PATCH}-{FRAME_PATCH}"

# Adds whatever belongs after main layer i to the joint sequence: (i, sequence) -> sequence.
AfterLayer = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Tokens:
    """A forward's sequences before the main layers, each `[B, L, ...]` padded over the batch, with
    each item's length, RoPE table and key-padding mask (None where every item has the same length)."""

    adaln: torch.Tensor  # [B, 256] the timestep embedding
    image_sizes: list[tuple[int, int, int]]  # (F, H, W) per item, for unpatchify
    image_pad: list[torch.Tensor]  # per item, the rows patchify padded to a multiple of 32
    image_lens: list[int]
    image: torch.Tensor  # the embedded image tokens, before the noise refiner
    image_freqs: torch.Tensor
    image_mask: torch.Tensor | None
    refined: torch.Tensor  # after the noise refiner
    caption_lens: list[int]
    caption: torch.Tensor  # after the caption refiner
    caption_freqs: torch.Tensor
    caption_mask: torch.Tensor | None
    joined: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # [refined; caption], freqs, mask

    def joint(self, transformer: nn.Module, image: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`[image_i; caption_i]` per item with its RoPE table and mask, as diffusers' forward builds the
        main layers' sequence (`image` is `[B, L, D]` at these items' image lengths)."""
        if image is self.refined and self.joined is not None:
            return self.joined
        unified, freqs, mask, _ = transformer._build_unified_sequence(
            image, self.image_freqs, self.image_lens, None, self.caption, self.caption_freqs, self.caption_lens,
            None, None, None, None, None, False, image.device)
        return unified, freqs, mask

    def rows(self, rows: Sequence[int]) -> Tokens:
        """These tokens for the items `rows` only, each part cut to those items' longest (diffusers'
        ControlNet runs over the controlled items alone: its padding and masks are theirs)."""
        index = torch.tensor(list(rows), dtype=torch.int64, device=self.adaln.device)
        image_lens, caption_lens = [self.image_lens[i] for i in rows], [self.caption_lens[i] for i in rows]

        def pick(t: torch.Tensor, length: int) -> torch.Tensor:
            return t.index_select(0, index)[:, :length]

        nx, nc, device = max(image_lens), max(caption_lens), self.adaln.device
        return Tokens(
            self.adaln.index_select(0, index), [self.image_sizes[i] for i in rows], [self.image_pad[i] for i in rows],
            image_lens, pick(self.image, nx), pick(self.image_freqs, nx), key_padding_mask(image_lens, device),
            pick(self.refined, nx), caption_lens, pick(self.caption, nc), pick(self.caption_freqs, nc),
            key_padding_mask(caption_lens, device))


def key_padding_mask(lengths: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """`[B, max]` bool, True on each item's tokens; None where all are equal (diffusers' `_prepare_sequence`)."""
    if all(n == lengths[0] for n in lengths):
        return None
    mask = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def tokens(transformer: nn.Module, latents: list[torch.Tensor], t: torch.Tensor,
           captions: list[torch.Tensor]) -> Tokens:
    """diffusers' forward up to its main layers: timestep embedding, patchify, embedders, refiners,
    the joint sequence."""
    device = latents[0].device
    adaln = transformer.t_embedder(t * transformer.t_scale).type_as(latents[0])
    x, cap, sizes, x_pos, cap_pos, x_pad, cap_pad = transformer.patchify_and_embed(latents, captions, PATCH,
                                                                                   FRAME_PATCH)
    image_lens = [len(item) for item in x]
    x = transformer.all_x_embedder[EMBEDDER](torch.cat(x, dim=0))
    image, image_freqs, image_mask, _, _ = transformer._prepare_sequence(
        list(x.split(image_lens, dim=0)), x_pos, x_pad, transformer.x_pad_token, None, device)
    refined = image
    for layer in transformer.noise_refiner:
        refined = layer(refined, image_mask, image_freqs, adaln, None, None, None)
    caption_lens = [len(item) for item in cap]
    cap = transformer.cap_embedder(torch.cat(cap, dim=0))
    caption, caption_freqs, caption_mask, _, _ = transformer._prepare_sequence(
        list(cap.split(caption_lens, dim=0)), cap_pos, cap_pad, transformer.cap_pad_token, None, device)
    for layer in transformer.context_refiner:
        caption = layer(caption, caption_mask, caption_freqs)
    made = Tokens(adaln, sizes, x_pad, image_lens, image, image_freqs, image_mask, refined, caption_lens, caption,
                  caption_freqs, caption_mask)
    made.joined = made.joint(transformer, refined)
    return made


def finish(transformer: nn.Module, made: Tokens, after_layer: AfterLayer | None = None) -> list[torch.Tensor]:
    """diffusers' forward from its main layers on: each layer, then `after_layer` (the hints), the
    final layer, unpatchify."""
    unified, freqs, mask = made.joined
    for i, layer in enumerate(transformer.layers):
        unified = layer(unified, mask, freqs, made.adaln, None, None, None)
        if after_layer is not None:
            unified = after_layer(i, unified)
    unified = transformer.all_final_layer[EMBEDDER](unified, c=made.adaln)
    return transformer.unpatchify(list(unified.unbind(dim=0)), made.image_sizes, PATCH, FRAME_PATCH, None)
