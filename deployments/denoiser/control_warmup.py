"""The Denoiser's warm-up with a ControlNet loaded: controlled forwards beside the plain ones.

Why: a controlled step runs what no plain forward does: the ControlNet's embedders and control
blocks, the transformer's refiners called from the ControlNet (another call site of the compiled
blocks), the hints (about 0.5 GB per 1024x1024 image) that the allocator has to grow for, and on a
GPU the control blocks' kernel choices and attention plans per sequence length. Without these calls
the first controlled request at any size pays all of that.

The controlled calls follow the plain warm-up's phases (`dit.warmup.serving_calls`,
`dit.size_warmup`), each a copy of a plain call whose first image carries a random control input at
the default scale (0.75); other images of a batch run uncontrolled, as they do beside a controlled
job in a step batch (`denoiser.control`, the batching rule):

- before ready: at each warm-up size, batch 1 at the warm-up's caption length, with a plain control
  input and, for a Union 2.x ControlNet (control channels past the latents'), in the inpainting
  layout (keep-mask and masked-image latents);
- after ready, with the batches over one image (which gate batching): the same batches with one
  controlled image, equal and ragged captions;
- after ready, with the shapes' warm-up (GPU): batch 1 at every other caption bucket (with CUDA
  graphs, the controlled graphs' first forwards at the warm-up sizes stand for these), then one
  forward at each preset size not warmed (`dit.size_warmup` runs its plain first forwards there).

They run only where the plain warm-up runs (compile on, `warmup_sizes` not empty): no setting of
their own. This module plans them; the plan's owner (`dit.warmup`) runs them, each controlled call
through the runner's own random control inputs (`ControlNetRunner.warmup_controls`). Their outputs are dropped; nothing they run is kept but caches of the same kind the plain
warm-up fills, so no output depends on them (tests/unit/test_control_warmup.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial

from deployments.denoiser.control import ControlNetRunner
from deployments.denoiser.dit.warmup import WarmupCall, run_call
from deployments.geometry import image_tokens

FORMS = ("control", "mask")  # a plain control input; the inpainting layout (Union 2.x)


def controlled(calls: Sequence[WarmupCall], takes_mask: bool = False) -> list[WarmupCall]:
    """A controlled copy of each call without LoRA (keyed `<key>/control`), with `takes_mask` also one
    in the inpainting layout (`<key>/control-mask`)."""
    forms = FORMS if takes_mask else FORMS[:1]
    return [replace(call, key=f"{call.key}/{'control' if form == 'control' else 'control-mask'}", control=form)
            for call in calls if not call.lora_rank for form in forms]


def serving_control_calls(single: Sequence[WarmupCall], batched: Sequence[WarmupCall], takes_mask: bool,
                          presets: Iterable[tuple[int, int]] = ()
                          ) -> tuple[list[WarmupCall], list[WarmupCall], list[WarmupCall]]:
    """The controlled calls for a serving warm-up cut as (`single`, `batched`): (before ready, with the
    batches after ready, with the shapes after ready); see the module docstring. Batches over one
    image that the plain warm-up runs before ready (`warm_batches_in_background` off) stay there.
    The shapes' part ends with one call per size of `presets` not warmed, at the warm-up's caption
    length, fewest tokens first."""
    plain = [call for call in single if call.batch == 1 and "/cap" not in call.key and not call.lora_rank]
    buckets = [call for call in single if call.batch == 1 and "/cap" in call.key]
    early = [call for call in single if call.batch > 1]
    warm = {(call.width, call.height) for call in plain}
    caption = plain[0].caption_lens if plain else ()
    others = [WarmupCall(f"{w}x{h}/b1", w, h, caption)
              for w, h in sorted(set(presets) - warm, key=lambda s: (image_tokens(*s), s)) if caption]
    return (controlled(plain, takes_mask) + controlled(early), controlled(batched),
            controlled(buckets) + controlled(others))


def control_steps(transformer, runner: ControlNetRunner, calls: Sequence[WarmupCall]) -> list[tuple[str, partial]]:
    """`calls` as background warm-up steps (`runtime.background_warmup`)."""
    return [(call.key, partial(run_call, transformer, call, control=runner)) for call in calls]
