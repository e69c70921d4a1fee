"""The denoise loop: FlowMatch Euler over Z-Image's sigmas, for a batch of independent jobs.

Computes what diffusers' `ZImagePipeline` / `ZImageImg2ImgPipeline` / `ZImageInpaintPipeline` compute
(the inpainting blend: deployments.denoiser.inpaint), and with a ControlNet `ZImageControlNetPipeline` /
`ZImageControlNetInpaintPipeline` (the hints: deployments.denoiser.control), cut so that a batch may
mix jobs of different sizes, caption lengths, step counts, seeds, guidance and start points: each
job carries its own schedule and step index (`DenoiseState`), and one `step()` advances any set of
states by one step each. That is what both same-shape batching and step-level continuous batching
build on.

Batch invariance: a job's latents should not depend on which other jobs share its steps. On the CPU
a GEMM's rounding depends on its row count (PyTorch's kernels sum in another order for one or a few
rows than for many), and a batched forward changes the row counts: the timestep MLP and the adaLN
projections have one row per image. So with `batch_invariant` the model runs once per job (a guided
job's negative pass together with its positive, as alone), exactly the call the job gets alone,
while admission, scheduling and stepping stay batched. That is the default on the CPU; on the GPU
batched GEMMs are the point, and there a job agrees with its run alone within bf16 noise.

Seeds: initial noise is drawn with `torch.Generator("cpu").manual_seed(seed)` in the shape diffusers
draws (for image-to-image, after the generator has sampled the VAE posterior, as diffusers does), so
a seed means the same image on any device.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from deployments.contracts import DenoiseJob, Latents
from deployments.denoiser.control import ControlNetRunner, run_transformer
from deployments.denoiser.inpaint import InpaintState
from deployments.denoiser.lora.errors import LoraUnsupportedError
from deployments.denoiser.lora.slots import LoraSlots, install_lora
from deployments.geometry import image_tokens, latent_shape

def default_sigmas(steps: int) -> list[float]:
    """Z-Image's sigma ramp, before the scheduler's shift."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def first_step_index(steps: int, strength: float) -> int:
    """Image-to-image skips the noisiest steps: as diffusers' `get_timesteps`."""
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))


@dataclass(frozen=True)
class Schedule:
    timesteps: torch.Tensor  # [n] float32, the steps this job runs
    sigmas: torch.Tensor  # [n + 1] float32, the last is 0


class ScheduleTable:
    """Per-job schedules from the checkpoint's scheduler config, computed once per shape and cached."""

    def __init__(self, scheduler):
        self._scheduler = copy.deepcopy(scheduler)
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int], Schedule] = {}

    def _mu(self, seq_len: int) -> float:
        cfg = self._scheduler.config
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        return seq_len * m + (base_shift - m * base_len)

    def full(self, steps: int, seq_len: int) -> Schedule:
        key = (steps, seq_len)
        with self._lock:
            if key not in self._cache:
                self._scheduler.set_timesteps(sigmas=default_sigmas(steps), mu=self._mu(seq_len))
                self._cache[key] = Schedule(
                    timesteps=self._scheduler.timesteps.clone(), sigmas=self._scheduler.sigmas.clone()
                )
            return self._cache[key]

    def for_job(self, job: DenoiseJob) -> Schedule:
        full = self.full(job.steps, image_tokens(job.width, job.height))
        if not job.is_image_to_image:
            return full
        start = first_step_index(job.steps, job.strength)
        if start >= job.steps:
            raise ValueError(f"strength {job.strength} leaves no denoising step out of {job.steps}")
        return Schedule(timesteps=full.timesteps[start:], sigmas=full.sigmas[start:])


class NonFiniteLatentsError(RuntimeError):
    """The model produced NaN or infinity for a job."""


@dataclass
class DenoiseState:
    """One job in flight: its latents, its own schedule and how far it has got."""

    job: DenoiseJob
    latents: torch.Tensor  # [1, C, h, w] float32 on the compute device
    schedule: Schedule
    caption: torch.Tensor  # on the compute device, in the model's dtype
    negative_caption: torch.Tensor | None
    step_index: int = 0
    inpaint: InpaintState | None = None  # set for a job with a mask (deployments.denoiser.inpaint)

    @property
    def total_steps(self) -> int:
        return len(self.schedule.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def uses_guidance(self) -> bool:
        return self.job.guidance_scale > 0 and self.negative_caption is not None

    def result(self) -> Latents:
        """The finished latents; non-finite values fail the job rather than ship a broken image."""
        if not torch.isfinite(self.latents).all():
            raise NonFiniteLatentsError(f"job with seed {self.job.seed} produced non-finite latents")
        return Latents(
            latents=self.latents.to("cpu"), width=self.job.width, height=self.job.height, steps_run=self.step_index
        )


def clean_estimate(state: DenoiseState, noise_pred: torch.Tensor) -> torch.Tensor:
    """The model's current estimate of the clean latents after a step, as float32 on the CPU.

    The step moved `latents += (sigma_next - sigma_t) * noise_pred`, so
    `latents - sigma_next * noise_pred` equals `x0_hat = latents_t - sigma_t * noise_pred`: the point
    the flow-matching velocity heads for. After the last step (sigma 0) it is the result itself.
    """
    sigma = state.schedule.sigmas[state.step_index]
    estimate = state.latents - sigma * noise_pred.to(torch.float32)
    if state.inpaint is not None:
        estimate = state.inpaint.clean_estimate(estimate)
    return estimate.to("cpu")


def preview_steps(total_steps: int, count: int) -> frozenset[int]:
    """The steps (1-based, counted after the step) after which a stream sends one of `count` previews:
    spread evenly, never the last (the finished image follows it); fewer when the steps are fewer."""
    return frozenset(s for i in range(count) if 0 < (s := round(total_steps * (i + 1) / (count + 1))) < total_steps)


# A transformer call over ragged lists: (latents [C,1,h,w] list, t [B], captions list) -> outputs list.
TransformerFn = Callable[[list[torch.Tensor], torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]


def diffusers_transformer_fn(transformer) -> TransformerFn:
    """The transformer's forward (controlled while a ControlNet's inputs are in effect: `run_transformer`)."""

    def call(latents: list[torch.Tensor], t: torch.Tensor, captions: list[torch.Tensor]) -> list[torch.Tensor]:
        return run_transformer(transformer, latents, t, captions)

    return call


class DenoiseLoop:
    """Starts jobs and advances any mix of them one step at a time."""

    def __init__(
        self,
        transformer,
        scheduler,
        device: torch.device,
        dtype: torch.dtype,
        transformer_fn: TransformerFn | None = None,
        batch_invariant: bool | None = None,
        batched_ready: threading.Event | None = None,
        lora: bool = True,
        control: ControlNetRunner | None = None,
    ):
        """`batch_invariant` (None: on for the CPU, off elsewhere) runs the model once per job, so that a
        job's latents are bitwise the same alone or in any batch: CPU GEMM rounding depends on the
        row count, which a batched forward changes (see the module docstring).

        `lora` (default on): the block linears carry per-job LoRA adapters (`lora.slots`); off, jobs
        with adapters fail.

        `batched_ready` (None: always): until it is set, every forward carries one image (a guided
        job's negative pass too), because only the batch-1 graphs are compiled yet
        (`deployments.denoiser.batched_warmup`); a batch of 2 or more would compile on the request path."""
        self.transformer = transformer
        self.batch_invariant = device.type == "cpu" if batch_invariant is None else batch_invariant
        self.batched_ready = batched_ready
        self.channels = transformer.config.in_channels
        self.device = device
        self.dtype = dtype
        self.schedules = ScheduleTable(scheduler)
        self.plain_fn = diffusers_transformer_fn(transformer)
        self.transformer_fn = transformer_fn or self.plain_fn
        self.lora_slots: LoraSlots | None = install_lora(transformer) if lora else None
        self.control = control  # the ControlNet, when one is loaded (deployments.denoiser.control)

    def initial_latents(self, job: DenoiseJob, schedule: Schedule) -> torch.Tensor:
        return self._start_point(job, schedule)[0]

    def _start_point(self, job: DenoiseJob, schedule: Schedule) -> tuple[torch.Tensor, InpaintState | None]:
        """The job's first latents, and for a masked job what its blend keeps (the sampled upload
        latents and the noise drawn after them, as diffusers' inpaint pipeline draws them)."""
        generator = torch.Generator("cpu").manual_seed(job.seed)
        shape = latent_shape(self.channels, job.width, job.height)
        if not job.is_image_to_image:
            if job.mask is not None:
                raise ValueError("a mask needs an init image")
            return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(self.device), None
        image_latents = job.init_posterior.sample(generator)  # consumes the generator first, as diffusers
        if tuple(image_latents.shape) != shape:
            raise ValueError(f"init latents have shape {tuple(image_latents.shape)}, expected {shape}")
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=image_latents.dtype)
        sigma = schedule.sigmas[0]
        latents = (sigma * noise + (1.0 - sigma) * image_latents).to(self.device, torch.float32)
        if job.mask is None:
            return latents, None
        return latents, InpaintState.create(job.mask, image_latents, noise, self.device)

    def start(self, job: DenoiseJob) -> DenoiseState:
        if job.loras and self.lora_slots is None:
            raise LoraUnsupportedError("this replica's DiT kernels do not apply LoRA adapters")
        if len(job.adapters) != len(job.loras):
            raise ValueError(f"the job asks for {len(job.loras)} LoRA adapters and carries {len(job.adapters)}")
        if job.control is not None and self.control is None:
            raise ValueError("a control image needs a ControlNet; none is loaded")
        schedule = self.schedules.for_job(job)
        negative = None
        if job.guidance_scale > 0:
            if job.negative_caption is None:
                raise ValueError("guidance_scale > 0 needs a negative caption embedding")
            negative = job.negative_caption.to(self.device, self.dtype)
        latents, inpaint = self._start_point(job, schedule)
        return DenoiseState(
            job=job,
            latents=latents,
            schedule=Schedule(schedule.timesteps.to(self.device), schedule.sigmas.to(self.device)),
            caption=job.caption.to(self.device, self.dtype),
            negative_caption=negative,
            inpaint=inpaint,
        )

    @torch.inference_mode()
    def step(self, states: Sequence[DenoiseState]) -> None:
        """One Euler step for each state (each at its own timestep); guided jobs add a negative pass."""
        states = [s for s in states if not s.done]
        if not states:
            return
        if not self.batched_forwards():  # only batch-1 graphs are compiled yet
            predictions = self._predict(states, one_image_per_forward=True)
        elif self.batch_invariant:  # one model call per job: the call it gets alone
            predictions = [pair for state in states for pair in self._predict([state])]
        else:
            predictions = self._predict(states)
        for state, (pred, neg) in zip(states, predictions):
            pred = pred.float()
            if neg is not None:
                pred = pred + state.job.guidance_scale * (pred - neg.float())
            noise_pred = -pred.squeeze(1).unsqueeze(0)
            sigmas = state.schedule.sigmas
            dt = sigmas[state.step_index + 1] - sigmas[state.step_index]
            state.latents = (state.latents.to(torch.float32) + dt * noise_pred.to(torch.float32)).to(torch.float32)
            state.step_index += 1
            if state.inpaint is not None:  # outside the mask, back to the upload at the next sigma
                sigma_next = None if state.done else sigmas[state.step_index]
                state.latents = state.inpaint.blend(state.latents, sigma_next)
            if state.job.on_step is not None:
                state.job.on_step(state, noise_pred)

    def batched_forwards(self) -> bool:
        """Whether a forward may carry more than one image (see `batched_ready`)."""
        return self.batched_ready is None or self.batched_ready.is_set()

    def _predict(
        self, states: Sequence[DenoiseState], one_image_per_forward: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """One transformer call for `states`: every positive pass, then the guided jobs' negative passes
        (as diffusers batches a guided image); with `one_image_per_forward`, one call per pass instead.
        Returns each state's (positive, negative or None) output."""
        model_latents, model_t, model_caps, controls = [], [], [], []
        guided = [s for s in states if s.uses_guidance]
        for state, caption in [(s, s.caption) for s in states] + [(s, s.negative_caption) for s in guided]:
            model_latents.append(state.latents.to(self.dtype).unsqueeze(2)[0])
            model_t.append(state.schedule.timesteps[state.step_index])
            model_caps.append(caption)
            controls.append(state.job.control)  # a negative pass takes its job's control too
        t = torch.stack(model_t)
        t = (1000 - t) / 1000
        adapters = [s.job.adapters for s in states] + [s.job.adapters for s in guided]
        if one_image_per_forward:  # each t its own tensor, as a lone job's (not a view at an offset)
            outputs = [self._forward([x], t[i : i + 1].clone(), [c], adapters[i : i + 1], controls[i : i + 1])[0]
                       for i, (x, c) in enumerate(zip(model_latents, model_caps))]
        else:
            outputs = self._forward(model_latents, t, model_caps, adapters, controls)
        negatives = dict(zip((id(s) for s in guided), outputs[len(states) :]))
        return [(out, negatives.get(id(state))) for state, out in zip(states, outputs[: len(states)])]

    def _forward(self, latents, t, captions, adapters, controls) -> list[torch.Tensor]:
        """One transformer call; row i with `adapters[i]` (`lora.slots`) and `controls[i]` (the
        ControlNet's hints: deployments.denoiser.control), both in effect around `transformer_fn`, whose
        CUDA graphs take them as static inputs (`dit.step_graphs`)."""
        with contextlib.ExitStack() as inputs:
            if any(adapters):
                inputs.enter_context(self.lora_slots.using(adapters))
            if any(c is not None for c in controls):
                inputs.enter_context(self.control.using(controls))
            return self.transformer_fn(latents, t, captions)

    def run(self, jobs: Sequence[DenoiseJob]) -> list[Latents]:
        """Runs a batch of jobs to completion together."""
        states = [self.start(job) for job in jobs]
        while not all(s.done for s in states):
            self.step(states)
        return [s.result() for s in states]
