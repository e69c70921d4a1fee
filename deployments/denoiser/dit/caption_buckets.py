"""Captions padded to their bucket ourselves, so that one CUDA graph serves every length in a bucket.

diffusers' `ZImageTransformer2DModel` already runs a caption of L tokens as a sequence of
B = L rounded up to a multiple of `SEQ_MULTI_OF` (32) tokens, whatever L is:
- `_pad_with_ids` appends B - L copies of the last row, so the caption embedder sees B rows;
- `_prepare_sequence` then overwrites the pad rows with the learned `cap_pad_token`, through a
  boolean pad mask (a tensor);
- the position ids are 1..B for all B rows (the grid is built for the padded length, and the extra
  ids it appends for the pad rows are cut off with the padding of the rotary table), and the image's
  positions start after B;
- at batch 1 nothing masks the pad rows: they take part in attention as tokens of their own, and
  the joint sequence is [image; B caption rows].
So L changes one thing only: which rows the pad mask marks, and that is data, not shape.

`pad_caption` builds the B rows diffusers builds (the last row repeated) and the mask it builds;
`padded_transformer_fn` runs the model on such a caption with that mask in place of the model's own
(which is all False for a caption already B long). The model then computes, op for op on the same
values, what it computes for the L-token caption: the same function, bitwise on one device
(tests/unit/test_caption_buckets.py), and a CUDA graph captured for (image shape, B) replays any L
of the bucket by copying the caption and the mask into its static inputs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from deployments.denoiser.control import run_transformer
from deployments.denoiser.loop import TransformerFn

SEQ_MULTI_OF = 32  # diffusers' transformer_z_image.SEQ_MULTI_OF (a test checks they agree)

# (latents, t, captions padded to their buckets, one `[B]` bool pad mask per caption) -> outputs
PaddedTransformerFn = Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor], list[torch.Tensor]],
                               list[torch.Tensor]]

_override = threading.local()  # the pad masks of the call running on this thread, if any


def caption_bucket(length: int) -> int:
    """The padded length diffusers runs a caption of `length` tokens at."""
    if length < 1:
        raise ValueError(f"a caption has at least one token, got {length}")
    return -(-length // SEQ_MULTI_OF) * SEQ_MULTI_OF


def pad_mask(length: int, bucket: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`[bucket]` bool, True for the pad rows (those at `length` and after)."""
    return torch.arange(bucket, device=device) >= length


def pad_caption(caption: torch.Tensor, bucket: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[bucket, D]` caption, `[bucket]` pad mask): the rows and the mask diffusers builds for it."""
    length = caption.shape[0]
    bucket = caption_bucket(length) if bucket is None else bucket
    if bucket < length:
        raise ValueError(f"bucket {bucket} is shorter than the caption's {length} tokens")
    padded = torch.cat([caption, caption[-1:].expand(bucket - length, -1)]) if bucket > length else caption
    return padded, pad_mask(length, bucket, caption.device)


def install_caption_pad_masks(transformer: nn.Module) -> nn.Module:
    """Lets a call made through `padded_transformer_fn` give the caption pad masks; in place, once.
    Any other call (diffusers' own pipeline, the plain forward) runs exactly as before."""
    if getattr(transformer, "_caption_pad_masks", False):
        return transformer
    original = transformer.patchify_and_embed

    def patchify_and_embed(all_image, all_cap_feats, patch_size, f_patch_size):
        out = original(all_image, all_cap_feats, patch_size, f_patch_size)
        masks = getattr(_override, "masks", None)
        if masks is None:
            return out
        cap_feats = out[1]
        if len(masks) != len(cap_feats) or any(m.shape[0] != c.shape[0] for m, c in zip(masks, cap_feats)):
            raise ValueError("one pad mask per caption, as long as its padded caption")
        return (*out[:6], list(masks))

    transformer.patchify_and_embed = patchify_and_embed
    transformer._caption_pad_masks = True
    return transformer


def padded_transformer_fn(transformer: nn.Module) -> PaddedTransformerFn:
    """The model called on bucket-padded captions with their pad masks (see the module docstring)."""
    install_caption_pad_masks(transformer)

    def call(latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor],
             masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for caption in captions:
            if caption.shape[0] % SEQ_MULTI_OF:
                raise ValueError(f"a padded caption is a multiple of {SEQ_MULTI_OF} rows, got {caption.shape[0]}")
        _override.masks = list(masks)
        try:
            return run_transformer(transformer, latents, t, captions)  # controlled too, with a ControlNet's inputs
        finally:
            _override.masks = None

    return call


def bucketed(padded: PaddedTransformerFn) -> TransformerFn:
    """A plain `TransformerFn` that pads each caption to its bucket and calls `padded`."""

    def call(latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor]) -> list[torch.Tensor]:
        pairs = [pad_caption(c) for c in captions]
        return padded(latents, t, [p for p, _ in pairs], [m for _, m in pairs])

    return call
