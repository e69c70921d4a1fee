"""ControlNet inside the Denoiser's step: what diffusers' `ZImageControlNetPipeline` and
`ZImageControlNetInpaintPipeline` compute, cut per job so that one step batch mixes jobs with and
without control, on the DiT's fast path.

A controlled job carries its control context (`ControlContext`): the control image's latents (the
VAE posterior's mode, normalised, as the pipelines' `retrieve_latents(..., "argmax")`), then for the
Union 2.x layout either zeros (plain control) or the keep-mask and the masked upload's latents
(control with a mask), `[C_in, 1, h, w]`, and its scale. Each step, the ControlNet runs over the
controlled rows of the batch only, on the tokens the DiT's own forward made (`control_forward`),
and its hints are added to the residual stream after the main layers they belong to (diffusers'
`controlnet_block_samples`). Its blocks run the DiT's block path: fused, FP8, compiled where the
DiT's are (`control_blocks`, which also says what stays bf16).

The batching rule: jobs with and without control, at any scales, share a step batch. The ControlNet
runs once over the controlled rows, with the scales as a `[n, 1, 1]` tensor where diffusers takes one
float (`hint * scale` is the same float32 product either way; the scale cannot be applied to the
outputs afterwards, as Union 2.1's own refiner adds scaled hints inside the ControlNet); an
uncontrolled row gets no hints: its residual stream is left as it is (diffusers adds zeros). A
guided job's negative pass takes the same control context, as diffusers repeats the control image.

One mechanism for every forward, as LoRA adapters (`lora.slots`): the loop puts a forward's control
inputs in effect (`ControlNetRunner.using`) and calls its `transformer_fn`; `run_transformer` is then
the controlled forward. So a one-image controlled forward replays a CUDA graph whose static inputs
are the control context and the scale (`dit.step_graphs`): the mask form (Union 2.x) is data of the
same shape, so one graph serves both.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deployments.contracts import ControlLatents
from deployments.denoiser import control_forward
from deployments.denoiser.control_blocks import join_dit
from deployments.denoiser.dit import forward as dit_forward
from deployments.denoiser.dit.blocks import model_device_dtype
from deployments.geometry import latent_shape

SEQ_MULTI_OF = 32  # diffusers pads the image and caption sequences to multiples of 32
DEFAULT_CONTROL_SCALE = 0.75  # diffusers' `controlnet_conditioning_scale`
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class ControlContext:
    """One job's control input for the ControlNet: `context` `[C_in, 1, h, w]` and its `scale`."""

    context: torch.Tensor
    scale: float


def control_context(control_latents: torch.Tensor, in_dim: int, keep_mask: torch.Tensor | None = None,
                    masked_latents: torch.Tensor | None = None) -> torch.Tensor:
    """`[C_in, 1, h, w]` float32 from `[1, 16, h, w]` control latents, as the pipelines concatenate it.

    Without a mask, channels past the latents are zeros (Union 2.x with plain control); with one,
    `keep_mask` `[1, 1, h, w]` (1 = keep, `1 - latent_mask`) and the masked upload's latents follow."""
    if (keep_mask is None) != (masked_latents is None):
        raise ValueError("control with a mask needs both the keep-mask and the masked image's latents")
    if keep_mask is not None:
        context = torch.cat([control_latents, keep_mask.to(control_latents.dtype), masked_latents], dim=1)
    elif in_dim > control_latents.shape[1]:
        pad = torch.zeros(1, in_dim - control_latents.shape[1], *control_latents.shape[2:], dtype=control_latents.dtype)
        context = torch.cat([control_latents, pad], dim=1)
    else:
        context = control_latents
    if context.shape[1] != in_dim:
        raise ValueError(f"the ControlNet takes {in_dim} control channels, got {context.shape[1]}")
    return context[0].unsqueeze(1)


def unified_length(latents: torch.Tensor, caption: torch.Tensor) -> int:
    """The transformer's per-item [image; caption] sequence length, each part padded to 32."""
    _, _, height, width = latents.shape  # [C, 1, h, w]
    image = (height // 2) * (width // 2)
    return image + (-image) % SEQ_MULTI_OF + len(caption) + (-len(caption)) % SEQ_MULTI_OF


@dataclass
class ControlInputs:
    """One forward's control inputs on the model's device: which rows are controlled (None: every row),
    each one's context `[C_in, 1, h, w]` and their scales `[n, 1, 1]`. A CUDA graph of a controlled
    forward reads a static copy of them (`static`) that each replay is `fill`ed from."""

    rows: tuple[int, ...] | None
    contexts: list[torch.Tensor]
    scales: torch.Tensor
    serial: int = field(default_factory=lambda: next(_SERIALS))  # these inputs, not equal ones made again
    holds: int | None = None  # a static copy: the serial of the inputs copied in last

    def static(self) -> ControlInputs:
        return ControlInputs(self.rows, [c.clone() for c in self.contexts], self.scales.clone(), holds=self.serial)

    def fill(self, given: ControlInputs) -> None:
        """Copies `given` (of the same shapes) in, unless they are the inputs copied last."""
        if self.holds == given.serial or given is self:
            return
        for static, value in zip(self.contexts + [self.scales], given.contexts + [given.scales]):
            static.copy_(value)
        self.holds = given.serial


_SERIALS = itertools.count(1)


class ControlNetRunner:
    """The loaded `ZImageControlNetModel` joined to the Denoiser's transformer: its blocks on the DiT's
    block path (`control_blocks`), its forward on the DiT's tokens (`control_forward`).

    A forward is controlled while its inputs are in effect (`using`, as `lora.slots` gives a forward
    its adapters): any call of the transformer through `run_transformer` (the loop's, the caption
    buckets', the CUDA graphs' captures) is then the controlled forward."""

    def __init__(self, controlnet: nn.Module, transformer: nn.Module, plan_cache: int = 2):
        self.controlnet = controlnet
        self.transformer = transformer
        self.in_dim = int(controlnet.config.control_in_dim)
        self.takes_mask = self.in_dim > LATENT_CHANNELS
        self.active: ControlInputs | None = None
        self._plans: OrderedDict[tuple, tuple[Sequence[ControlContext | None], ControlInputs]] = OrderedDict()
        self._plan_cache = plan_cache
        join_dit(controlnet, transformer)
        transformer._controlnet = self

    def context(self, latents: ControlLatents, scale: float, mask: torch.Tensor | None = None) -> ControlContext:
        """A job's `ControlContext`; with the job's latent-grid `mask` (1 = edit), the inpainting layout."""
        if mask is not None and not self.takes_mask:
            raise ValueError(f"this ControlNet takes {self.in_dim} control channels: it cannot inpaint with a mask")
        if (mask is None) != (latents.masked_image is None):
            raise ValueError("control with a mask needs the masked image's latents, and only then")
        keep = None if mask is None else 1.0 - mask
        return ControlContext(control_context(latents.control, self.in_dim, keep, latents.masked_image), scale)

    def plan(self, controls: Sequence[ControlContext | None]) -> ControlInputs | None:
        """The inputs of a forward whose row i has `controls[i]`, on the model's device; None when no row
        has any. The last few are kept (with their controls, so the identities in the key stay
        theirs): a job's steps copy its context to the device once."""
        rows = tuple(i for i, control in enumerate(controls) if control is not None)
        if not rows:
            return None
        key = tuple(id(control) for control in controls)
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            return cached[1]
        device, dtype = model_device_dtype(self.transformer)
        # One scale per row, `[n, 1, 1]`: the scale also weights the hints inside the ControlNet's own
        # refiner (Union 2.1), so it cannot be applied to its outputs afterwards.
        scales = torch.tensor([controls[i].scale for i in rows], dtype=torch.float32).view(-1, 1, 1)
        inputs = ControlInputs(None if len(rows) == len(controls) else rows,
                               [controls[i].context.to(device, dtype) for i in rows], scales.to(device, dtype))
        self._plans[key] = (tuple(controls), inputs)
        while len(self._plans) > self._plan_cache:
            self._plans.popitem(last=False)
        return inputs

    @contextlib.contextmanager
    def applied(self, inputs: ControlInputs | None) -> Iterator[None]:
        """Within the block, the transformer's forwards are controlled by `inputs` (none: plain)."""
        previous, self.active = self.active, inputs
        try:
            yield
        finally:
            self.active = previous

    def using(self, controls: Sequence[ControlContext | None]) -> contextlib.AbstractContextManager:
        """Within the block, a forward's row i is controlled by `controls[i]` (None: not controlled)."""
        return self.applied(self.plan(controls))

    def controlled(self, latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor]
                   ) -> list[torch.Tensor]:
        """The transformer's forward with the active inputs' hints added after the ControlNet's layers."""
        made = dit_forward.tokens(self.transformer, latents, t, captions)
        added = self._hints(made)
        return dit_forward.finish(self.transformer, made, added.add)

    def _hints(self, made: dit_forward.Tokens) -> control_forward.Hints:
        inputs = self.active
        if inputs.rows is not None and max(inputs.rows) >= len(made.image_lens):
            raise ValueError(f"control inputs for rows {inputs.rows} in a forward of {len(made.image_lens)} images")
        return control_forward.hints(self.controlnet, self.transformer, made, inputs.contexts, inputs.scales,
                                     inputs.rows)

    @torch.inference_mode()
    def forward(self, latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor],
                controls: Sequence[ControlContext | None]) -> list[torch.Tensor]:
        """The transformer's outputs with each row's hints added after the ControlNet's layers."""
        with self.using(controls):
            return run_transformer(self.transformer, latents, t, captions)

    @torch.inference_mode()
    def hints(self, latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor],
              controls: Sequence[ControlContext | None]) -> dict[int, torch.Tensor] | None:
        """`{layer: [B, S, dim]}` for the whole batch (zeros on uncontrolled rows), or None when no row is
        controlled: what the controlled forward adds, for inspection."""
        with self.using(controls):
            if self.active is None:
                return None
            made = dit_forward.tokens(self.transformer, latents, t, captions)
            added = self._hints(made)
        length = made.joined[0].shape[1]
        full = {}
        for layer, hint in added.by_layer.items():
            full[layer] = hint.new_zeros(len(latents), length, hint.shape[-1])
            full[layer][added.rows if added.rows is not None else slice(None), : hint.shape[1]] = hint
        return full

    def warmup_controls(self, call, generator: torch.Generator | None = None) -> list[ControlContext | None]:
        """A warm-up call's control inputs (`dit.warmup.WarmupCall` with `control` "control" or "mask"):
        random latents at its size for its first image (with "mask", a random keep-mask and masked-image
        latents), None for the others, at the default scale."""
        generator = generator or torch.Generator("cpu").manual_seed(0)
        shape = latent_shape(LATENT_CHANNELS, call.width, call.height)
        latents = torch.randn(shape, generator=generator)
        keep = masked = None
        if call.control == "mask":
            if not self.takes_mask:
                raise ValueError(f"warm-up call {call.key}: this ControlNet takes no mask")
            keep = (torch.rand((1, 1, *shape[2:]), generator=generator) > 0.5).float()
            masked = torch.randn(shape, generator=generator)
        context = ControlContext(control_context(latents, self.in_dim, keep, masked), DEFAULT_CONTROL_SCALE)
        return [context] + [None] * (call.batch - 1)


def run_transformer(transformer: nn.Module, latents: list[torch.Tensor], t: torch.Tensor,
                    captions: list[torch.Tensor]) -> list[torch.Tensor]:
    """The DiT's call: diffusers' forward, or while a ControlNet's inputs are in effect
    (`ControlNetRunner.using`), the controlled forward."""
    runner = getattr(transformer, "_controlnet", None)
    if runner is not None and runner.active is not None:
        return runner.controlled(latents, t, captions)
    return transformer(latents, t, captions, return_dict=False)[0]
