"""Typed contracts passed between stages.

Every value that crosses a deployment boundary is one of these: small, CPU-resident, picklable.
Keeping them in one module lets a reader see the whole request path's data at a glance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a tensor is made: the builder names these types without torch
    import torch


@dataclass(frozen=True)
class StageTime:
    """One model stage's part of an image's time, in milliseconds: `ms` from the call's arrival to its
    result, of which `queue_ms` waiting before its batch started (the Denoiser: before its first step)."""

    ms: float = 0.0
    queue_ms: float = 0.0

    @classmethod
    def since(cls, start: float, queued_s: float) -> StageTime:
        """From the call's `time.perf_counter()` at arrival and the seconds it waited in the queue."""
        return cls(round((time.perf_counter() - start) * 1000, 2), round(queued_s * 1000, 2))

    def __add__(self, other: StageTime) -> StageTime:
        return StageTime(round(self.ms + other.ms, 2), round(self.queue_ms + other.queue_ms, 2))


@dataclass(frozen=True)
class ImageTrace:
    """Where one image's time went in the model stages. It rides on each stage's result (caption,
    posterior, latents, decoded image): a stage sets its own entry and passes the others on, and the
    Ingress reads the decoded image's trace into the response's `timings` (serve_app.protocol.Timings,
    whose `<stage>_ms` and `<stage>_queue_ms` fields `as_ms` names)."""

    encode: StageTime = StageTime()  # the text encoder (the prompt; once per request)
    image_encode: StageTime = StageTime()  # the VAE's encoder (the upload of an edit; once per request)
    denoise: StageTime = StageTime()
    decode: StageTime = StageTime()

    def joined(self, other: ImageTrace) -> ImageTrace:
        """This trace's entries with `other`'s where `other` has timed a stage."""
        empty = StageTime()
        return ImageTrace(**{f.name: getattr(other, f.name) if getattr(other, f.name) != empty
                             else getattr(self, f.name) for f in fields(self)})

    def as_ms(self) -> dict[str, float]:
        """`{"encode_ms": ..., "encode_queue_ms": ..., ...}`: the response's field names."""
        out: dict[str, float] = {}
        for f in fields(self):
            stage: StageTime = getattr(self, f.name)
            out[f"{f.name}_ms"], out[f"{f.name}_queue_ms"] = stage.ms, stage.queue_ms
        return out


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """What every model stage's result carries on to the next: the time so far and what ran."""

    trace: ImageTrace = ImageTrace()
    """The stages so far, each stage setting its own entry (`ImageTrace`)."""
    speed: dict[str, str] = field(default_factory=dict)
    """What ran, by stage (`deployments.speed.Speed.summary`); each stage adds its own and passes them on."""


@dataclass(frozen=True)
class StyledPrompt:
    """A user prompt after style expansion; `text` is what the text encoder sees."""

    text: str
    style: str
    original: str


@dataclass(frozen=True)
class CaptionEmbedding(StageResult):
    """Ragged caption embedding `[L, hidden]` of one prompt (padding removed), on the CPU; its trace
    holds its time in the text encoder (`trace.encode`)."""

    embedding: torch.Tensor
    num_tokens: int
    truncated: bool
    """True when the prompt was longer than the token cap and its tail was dropped."""
    dropped_tokens: int = 0


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
    trace: ImageTrace = ImageTrace()
    """The upload's time in the VAE encoder (`trace.image_encode`)."""

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        import torch

        eps = torch.randn(self.mean.shape, generator=generator, device="cpu", dtype=self.mean.dtype)
        x = self.mean + self.std * eps
        return (x - self.shift_factor) * self.scaling_factor

    def mode(self) -> torch.Tensor:
        """The normalised mean: diffusers' `retrieve_latents(..., sample_mode="argmax")`, which the
        ControlNet pipelines use for control images (no generator consumed)."""
        return (self.mean - self.shift_factor) * self.scaling_factor


@dataclass(frozen=True)
class MaskedUpload:
    """An upload whose pixels to repaint are zeroed (0 in [-1, 1]) before the VAE encodes it, as
    `ZImageControlNetInpaintPipeline` encodes its masked image."""

    image: Any  # PIL RGB, at the generation size
    mask: Any  # PIL greyscale at the same size, 128 and up = repaint


@dataclass(frozen=True)
class ControlLatents:
    """A control image's latents (and, for control with a mask, the masked upload's), both
    `LatentPosterior.mode()` `[1, 16, h, w]`: what the VAE stage hands the Denoiser for a controlled job."""

    control: torch.Tensor
    masked_image: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraRef:
    """One LoRA adapter a request asks for: the operator's name for it and its scale."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True)
class TenantTag:
    """Whose work a job is, for the Denoiser's fair order (deployments/runtime/fair_share.py): the
    tenant's name (an API key's name, never the key) and its weight in the share of the GPU."""

    name: str = ""
    weight: float = 1.0


@dataclass(frozen=True)
class DenoiseRequest:
    """What the Ingress asks the Denoiser for one image; the tensors (caption, negative caption,
    upload posterior) travel beside it as separate arguments, so a request's images share one copy.

    A field added here reaches the Denoiser's job (`DenoiseJob` extends this class, and
    `DenoiseJob.from_request` copies every field) with no other change."""

    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float = 0.0
    strength: float = 1.0
    """Image-to-image only: a job without an upload always runs every step (`DenoiseJob.from_request`)."""
    mask: torch.Tensor | None = None
    """Inpainting (with an upload): `[1, 1, H/8, W/8]` of 1 (edit) and 0 (keep), from
    `deployments.inpaint_mask.InpaintMask.latents`; small, so it travels in the request."""
    control_scale: float | None = None
    """Set for a controlled image (its `ControlLatents` travel beside the request); with a mask the
    ControlNet inpaints (the mask enters its control channels, no blend, no strength)."""
    deadline: float | None = None
    """Wall-clock time (`time.time()`) after which the image is no longer wanted (deployments.runtime.deadlines)."""
    loras: tuple[LoraRef, ...] = ()
    """LoRA adapters by the operator's names, with their scales (deployments.denoiser.lora)."""
    tenant: TenantTag = TenantTag()
    """Whose image it is: the Denoiser's queue takes the jobs of several tenants by weighted fair share."""


@dataclass(frozen=True, kw_only=True)
class DenoiseJob(DenoiseRequest):
    """One image to denoise: the request's geometry, schedule and randomness, with its conditioning
    tensors. Built from a request by `from_request` (the Denoiser and the local pipeline); tests and
    benchmarks may construct one directly."""

    caption: torch.Tensor  # [L, hidden]
    negative_caption: torch.Tensor | None = None  # used only when guidance_scale > 0
    init_posterior: LatentPosterior | None = None  # image-to-image when set
    adapters: tuple[tuple[Any, float], ...] = ()
    """`loras` resolved: (`lora.layout.LaidOutAdapter`, scale) on the Denoiser's device, one per ref;
    never crosses a deployment boundary."""
    control: Any = None
    """A `deployments.denoiser.control.ControlContext` when the job is controlled (needs a ControlNet)."""
    on_step: Callable[[Any, torch.Tensor], None] | None = None
    """Called on the model thread after each of this job's steps with its `DenoiseState` and the step's
    noise prediction (what streaming previews are made from); never crosses a deployment boundary."""

    @classmethod
    def from_request(cls, request: DenoiseRequest, caption: CaptionEmbedding,
                     negative: CaptionEmbedding | None = None, posterior: LatentPosterior | None = None,
                     on_step: Callable[[Any, torch.Tensor], None] | None = None,
                     adapters: tuple[tuple[Any, float], ...] = (), control: Any = None) -> DenoiseJob:
        """The job for `request` with its conditioning: the one place a request becomes a job.
        `control` (a `ControlContext`, built by the Denoiser's ControlNet from the `ControlLatents`)
        carries a controlled job's mask in its channels: such a job starts from noise and is not blended."""
        asked = {f.name: getattr(request, f.name) for f in fields(DenoiseRequest)}
        if posterior is None:
            asked["strength"] = 1.0  # strength skips steps of an image-to-image schedule only
        if control is not None:
            if posterior is not None:
                raise ValueError("a controlled job starts from noise: control with an upload needs its mask")
            asked["mask"] = None  # in the control channels, as ZImageControlNetInpaintPipeline
        return cls(**asked, caption=caption.embedding,
                   negative_caption=None if negative is None else negative.embedding,
                   init_posterior=posterior, on_step=on_step, adapters=adapters, control=control)

    @property
    def is_image_to_image(self) -> bool:
        return self.init_posterior is not None


@dataclass(frozen=True)
class Latents(StageResult):
    """Denoised latents of one image in the DiT's space `[1, C, h, w]` (float32, CPU); its trace holds
    the caption's and the upload's stages, and the Denoiser's own."""

    latents: torch.Tensor
    width: int
    height: int
    steps_run: int = 0
    prompt_truncated: bool = False


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
class DecodedImage(StageResult):
    """An RGB image as uint8 `[H, W, 3]`; its trace holds the upstream stages' (from `Latents`) and the
    decoder's own."""

    pixels: torch.Tensor
    width: int
    height: int
    prompt_truncated: bool = False

