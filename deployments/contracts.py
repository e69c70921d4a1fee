"""Typed contracts passed between stages.

Every value that crosses a deployment boundary is one of these: small, CPU-resident, picklable.
Keeping them in one module lets a reader see the whole request path's data at a glance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class StyledPrompt:
    """A user prompt after style expansion; `text` is what the text encoder sees."""

    text: str
    style: str
    original: str


@dataclass(frozen=True)
class CaptionEmbedding:
    """Ragged caption embedding `[L, hidden]` of one prompt (padding removed), on the CPU."""

    embedding: torch.Tensor
    num_tokens: int
    truncated: bool
    """True when the prompt was longer than the token cap and its tail was dropped."""
    dropped_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds this caption spent in the text encoder, by name (see `Latents.timings`)."""
    speed: dict[str, str] = field(default_factory=dict)
    """What ran, by stage (`deployments.speed.Speed.summary`); each stage adds its own and passes them on."""


@dataclass(frozen=True)
class LatentPosterior:
    """The VAE encoder's Gaussian over an uploaded image's latents, in VAE space.

    The Denoiser samples it with the job's seeded generator (before drawing noise), exactly as
    diffusers' image-to-image pipeline consumes its generator, so that a seed means one image.
    """

    mean: torch.Tensor  # [1, C, h, w]
    std: torch.Tensor  # [1, C, h, w]
    shift_factor: float
    scaling_factor: float
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds the upload spent in the VAE encoder."""

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device="cpu", dtype=self.mean.dtype)
        x = self.mean + self.std * eps
        return (x - self.shift_factor) * self.scaling_factor


@dataclass(frozen=True)
class DenoiseRequest:
    """What the Ingress asks the Denoiser for one image; the tensors (caption, negative caption,
    upload posterior) travel beside it as separate arguments, so a request's images share one copy."""

    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float = 0.0
    strength: float = 1.0
    mask: torch.Tensor | None = None
    """Inpainting (with an upload): `[1, 1, H/8, W/8]` of 1 (edit) and 0 (keep), from
    `deployments.denoiser.inpaint.latent_mask`; small, so it travels in the request."""
    deadline: float | None = None
    """Wall-clock time (`time.time()`) after which the image is no longer wanted (deployments.runtime.deadlines)."""


@dataclass(frozen=True)
class DenoiseJob:
    """One image to denoise: conditioning, geometry, schedule and randomness."""

    caption: torch.Tensor  # [L, hidden]
    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float = 0.0
    negative_caption: torch.Tensor | None = None  # used only when guidance_scale > 0
    init_posterior: LatentPosterior | None = None  # image-to-image when set
    strength: float = 1.0
    mask: torch.Tensor | None = None  # inpainting: see DenoiseRequest.mask; needs init_posterior
    deadline: float | None = None  # wall-clock; a job past it is dropped (deployments.runtime.deadlines)
    on_step: Callable[[Any, torch.Tensor], None] | None = None
    """Called on the model thread after each of this job's steps with its `DenoiseState` and the step's
    noise prediction (what streaming previews are made from); never crosses a deployment boundary."""

    @property
    def is_image_to_image(self) -> bool:
        return self.init_posterior is not None


@dataclass(frozen=True)
class Latents:
    """Denoised latents of one image in the DiT's space `[1, C, h, w]` (float32, CPU)."""

    latents: torch.Tensor
    width: int
    height: int
    steps_run: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds per stage so far (text encoder, Denoiser): each stage adds its own and passes them on."""
    prompt_truncated: bool = False
    speed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DenoiseProgress:
    """One update of a streamed denoise (`Denoiser.denoise_stream`): after each step, the step count;
    at the steps chosen for previews, the model's current estimate of the clean latents; last, the result."""

    step: int
    steps: int
    elapsed_s: float
    preview: Latents | None = None
    result: Latents | None = None
    caption_tokens: int = 0


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image as uint8 `[H, W, 3]`."""

    pixels: torch.Tensor
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    """The upstream stages' milliseconds (from `Latents`) plus the decoder's own."""
    prompt_truncated: bool = False
    speed: dict[str, str] = field(default_factory=dict)

