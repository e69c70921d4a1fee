"""ControlNet inside the Denoiser's step: what diffusers' `ZImageControlNetPipeline` and
`ZImageControlNetInpaintPipeline` compute, cut per job so that one step batch mixes jobs with and
without control.

A controlled job carries its control context (`ControlContext`): the control image's latents (the
VAE posterior's mode, normalised, as the pipelines' `retrieve_latents(..., "argmax")`), then for the
Union 2.x layout either zeros (plain control) or the keep-mask and the masked upload's latents
(control with a mask), `[C_in, 1, h, w]`, and its scale. Each step, the ControlNet runs over the
controlled rows of the batch only and returns one hint per chosen main layer; the transformer adds
it to the residual stream after that layer (diffusers' `controlnet_block_samples`).

The batching rule: jobs with and without control, at any scales, share a step batch. The ControlNet
runs once over the controlled rows, with the scales as a `[B, 1, 1]` tensor where diffusers takes one
float (`hint * scale` is the same float32 product either way; the scale cannot be applied to the
outputs afterwards, as Union 2.1's own refiner adds scaled hints inside the ControlNet); an
uncontrolled row gets zero hints, and adding zero leaves its residual stream bitwise unchanged. A
guided job's negative pass takes the same control context, as diffusers repeats the control image.

Where the DiT runs with real-valued RoPE (`dit.rotary`), the ControlNet shares the transformer's
(real) rotary tables and its control blocks get the same real-valued attention processor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from deployments.contracts import ControlLatents
from deployments.denoiser.dit.rotary import RealRopeAttnProcessor, RealRopeEmbedder
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


class ControlNetRunner:
    """The loaded `ZImageControlNetModel`, attached to the Denoiser's transformer."""

    def __init__(self, controlnet: nn.Module, transformer: nn.Module):
        from diffusers import ZImageControlNetModel

        self.controlnet = ZImageControlNetModel.from_transformer(controlnet, transformer)
        self.transformer = transformer
        self.in_dim = int(controlnet.config.control_in_dim)
        self.takes_mask = self.in_dim > LATENT_CHANNELS
        if isinstance(transformer.rope_embedder, RealRopeEmbedder):
            processor = RealRopeAttnProcessor()
            for name in ("control_layers", "control_noise_refiner"):
                for block in getattr(controlnet, name, None) or []:
                    if hasattr(block, "attention"):
                        block.attention.set_processor(processor)

    def context(self, latents: ControlLatents, scale: float, mask: torch.Tensor | None = None) -> ControlContext:
        """A job's `ControlContext`; with the job's latent-grid `mask` (1 = edit), the inpainting layout."""
        if mask is not None and not self.takes_mask:
            raise ValueError(f"this ControlNet takes {self.in_dim} control channels: it cannot inpaint with a mask")
        if (mask is None) != (latents.masked_image is None):
            raise ValueError("control with a mask needs the masked image's latents, and only then")
        keep = None if mask is None else 1.0 - mask
        return ControlContext(control_context(latents.control, self.in_dim, keep, latents.masked_image), scale)

    @torch.inference_mode()
    def hints(self, latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor],
              controls: list[ControlContext | None]) -> dict[int, torch.Tensor] | None:
        """`{layer: [B, S, dim]}` for the whole batch, or None when no row is controlled."""
        rows = [i for i, control in enumerate(controls) if control is not None]
        if not rows:
            return None
        dtype = latents[0].dtype
        # One scale per row, `[B, 1, 1]`: the scale also weights the hints inside the ControlNet's own
        # refiner (Union 2.1), so it cannot be applied to its outputs afterwards.
        scales = torch.tensor([controls[i].scale for i in rows], dtype=torch.float32).view(-1, 1, 1)
        with self._adapters_of(rows, len(controls)):
            out = self.controlnet([latents[i] for i in rows], t[rows], [captions[i] for i in rows],
                                  [controls[i].context.to(latents[i].device, dtype) for i in rows],
                                  conditioning_scale=scales.to(latents[0].device, dtype))
        lengths = [unified_length(x, c) for x, c in zip(latents, captions)]
        if len(rows) == len(controls):
            return out
        hints = {}
        for layer, hint in out.items():
            full = hint.new_zeros(len(controls), max(lengths), hint.shape[-1])
            for j, i in enumerate(rows):
                full[i, : lengths[i]] = hint[j, : lengths[i]]
            hints[layer] = full
        return hints

    def _adapters_of(self, rows: list[int], batch: int):
        """The ControlNet runs the transformer's refiners on the controlled rows only: with LoRA
        adapters in the forward (`lora.slots`), those rows' adapters, not the whole batch's."""
        slots = getattr(self.transformer, "_lora_slots", None)
        if slots is None or slots.active is None or len(rows) == batch:
            return contextlib.nullcontext()
        return slots.applied(slots.active.rows(rows))

    def forward(self, latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor],
                controls: list[ControlContext | None]) -> list[torch.Tensor]:
        """The transformer's outputs with each row's hints added after the ControlNet's layers."""
        hints = self.hints(latents, t, captions, controls)
        return self.transformer(latents, t, captions, controlnet_block_samples=hints, return_dict=False)[0]

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
