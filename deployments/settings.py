"""The settings every model-holding stage receives: which weights, where, in what precision.

The builder validates them where no model runs (a CPU head node), so this module imports no torch:
what needs it (the device, the dtype) imports it when a replica asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.geometry import parse_size
from deployments.runtime.artifact_store import SharedCompileCache
from deployments.speed import SPEED_FIELDS, Hardware, Speed, resolve_speed
from deployments.weights.model_source import ModelSource, default_cache_dir, resolve_model_source

if TYPE_CHECKING:
    import torch


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny"
    controlnet: str | None = None
    """A Z-Image ControlNet for the Denoiser (`weights.controlnet_source`): a hub id, a directory in
    diffusers layout, a published single file, `tiny` (with the tiny model) or `random`; off by default.
    With one loaded, requests may carry a control image (`control_image`, `control_scale`)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp8"] = "auto"
    """The DiT's linears: `fp8` (torchao or our fused kernels) or `bf16`; `auto`: fp8 on GPUs with FP8
    tensor cores (sm89 and up), else bf16; the CPU runs float32 whatever is set. The speed settings
    marked `auto` resolve on each replica's own device (`deployments.speed`), logged with their
    reasons and reported in `stats()["speed"]` and each response's `speed`."""
    compile: bool | Literal["auto"] = "auto"
    """Regional compile of the DiT blocks, cached on disk (`auto`: on where Triton runs; GPU only)."""
    cache_dir: str | None = None
    compile_cache: SharedCompileCache | None = None
    """A store every node shares for the stages' compiled code (`runtime.compile_cache`), beside each
    node's own copy under `cache_dir`: `{directory: /mnt/shared/zimage-compile}` (a filesystem mounted
    on every node) or `{s3: {bucket, prefix, endpoint_url, region}}` (credentials from the replicas'
    environment, as the image store's). A replica fetches its stage's file at start and writes it after
    its warm-ups when it compiled something the file lacked; `zimage-serve-cache build` fills it ahead of
    a rollout. None: each node caches for itself."""
    max_prompt_tokens: int = Field(512, ge=16, le=4096)
    vae_tile_above_px: int = Field(1024 * 1024, ge=512 * 512)
    vae_batched_decode: bool = False
    vae_tile_px: int = Field(1024, ge=256, le=4096)
    vae_tile_overlap: float = Field(0.25, ge=0.0, le=0.5)
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = "cudnn"
    fp8_kernels: Literal["auto", "inductor", "fused", "fused-bf16-attention"] = "auto"
    """How the FP8 DiT runs (`dit.optimize.Fp8Kernels`): `inductor` (torchao's FP8 linears, inductor's
    kernels around them), `fused` (our Triton kernels and cuDNN's FP8 attention: 59.2 against 68.5 ms
    a 1024x1024 step in one run, RESULTS.md round of 2026-12-01; with 20 clients 2.79x the plain
    server's throughput, its second round, `serve_shipped.json`),
    `fused-bf16-attention`, or `auto` (`fused` on a Hopper GPU with `nvidia-cudnn-frontend`
    installed, `fused-bf16-attention` on a Hopper without it, else `inductor`)."""
    dit_cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay batch-1 DiT forwards from CUDA graphs, one per (size, caption bucket of 32 tokens),
    captured for every bucket at the warm-up sizes after ready and for other sizes on a shape's
    second forward (`dit.step_graphs`, `dit.size_warmup`; `auto`: on, GPU only). For host-bound steps: small
    images on the fused FP8 path."""
    text_encoder_cuda_graphs: bool = True
    text_encoder_compile: bool | Literal["auto"] = "auto"
    """Compile the text encoder's decoder layers (`auto`: on where Triton runs; GPU only; replayed
    inside the CUDA graphs)."""
    batch_invariant: bool | None = None
    """Run the DiT once per job and the text encoder once per prompt, so that a request's result is
    bitwise the same alone or in any batch (CPU GEMM rounding depends on the row count, which batching
    changes), while scheduling stays batched. None: on for the CPU, off on the GPU, where batched
    GEMMs are the point and results agree within bf16 noise."""
    vae_compile: bool | Literal["auto"] = "auto"
    """Compile the VAE decoder (`auto`: on where Triton runs; GPU only): static graphs for
    `warmup_sizes` before ready, one dynamic graph for other sizes after ready."""
    warmup_sizes: tuple[str, ...] = ("512x512", "1024x1024")
    """Sizes ("WxH") the Denoiser and the VAE decoder compile for before they report ready, so no
    request pays for it (with compile; other sizes: the DiT's dynamic graph, the VAE's after ready)."""
    warm_batches_in_background: bool = True
    """The Denoiser reports ready once its batch-1 graphs are compiled and compiles the graphs of
    batches over one image afterwards, between requests, running each image of a batch as its own
    forward until they are ready: a new replica serves seconds sooner (tracing those graphs took
    several seconds each even with warm caches). False: all of them before ready, as one warm-up."""
    vae_dynamic_in_background: bool = True
    """With `vae_compile`, the VAE decoder reports ready once its static graphs for `warmup_sizes`
    are compiled and compiles its dynamic graph (every other size) afterwards, one call at a time
    between requests, decoding other sizes eagerly until then: most of its cold start was that
    graph. A request to the replica may wait for one such call meanwhile. False: all before ready."""

    lora_dir: str | None = None
    """The operator's LoRA adapters, one `.safetensors` file per adapter, named by its stem
    (deployments.denoiser.lora.library); None: `loras/` under `cache_dir` (ZIMAGE_CACHE_DIR). On a cluster, a shared
    filesystem mounted at this path on every node, or `lora_hub` aliases."""
    lora_hub: dict[str, str] = Field(default_factory=dict)
    """Aliases of hub files the operator allows: `{name: "owner/repo[@revision][:file.safetensors]"}`
    (deployments.denoiser.lora.hub). Requests name the alias; each Denoiser replica fetches the file
    through huggingface_hub the first time it needs it."""
    lora_hub_cache_dir: str | None = None
    """Where hub adapters are cached; None: huggingface_hub's cache (HF_HUB_CACHE, HF_HOME)."""
    lora_max_file_bytes: int = Field(1 << 30, ge=1)
    lora_max_rank: int = Field(256, ge=1)
    lora_max_files: int = Field(1000, ge=1)

    def lora_fields(self) -> dict:
        """`lora_settings()`'s fields as plain values: the builder hands them to the Ingress without
        importing the adapters' code (and torch)."""
        lora_dir = self.lora_dir or (str(Path(self.cache_dir).expanduser() / "loras") if self.cache_dir else None)
        return {"lora_dir": lora_dir, "max_file_bytes": self.lora_max_file_bytes, "max_rank": self.lora_max_rank,
                "max_files": self.lora_max_files, "hub": dict(self.lora_hub), "hub_cache_dir": self.lora_hub_cache_dir}

    def lora_settings(self):
        from deployments.denoiser.lora.library import LoraSettings

        return LoraSettings(**self.lora_fields())

    @field_validator("lora_hub")
    @classmethod
    def _check_lora_hub(cls, value: dict[str, str]) -> dict[str, str]:
        """A bad alias or hub file fails when the app is built, not at a request. (The name pattern
        lives with the adapters' code, which imports torch: only aliases that are set are checked.)"""
        if not value:
            return value
        from deployments.denoiser.lora.hub import parse_aliases
        from deployments.denoiser.lora.library import NAME_PATTERN

        parse_aliases(value, NAME_PATTERN)
        return value

    def resolve_speed(self, device: torch.device) -> Speed:
        """The speed settings, `auto` resolved for `device` as this process sees it (in the replica)."""
        return resolve_speed(Hardware.probe(device), **{name: getattr(self, name) for name in SPEED_FIELDS})

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value):
        """Accepts "512x512,1024x1024" from a command line as well as a list."""
        return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    def source(self) -> ModelSource:
        return resolve_model_source(self.model, self.cache_dir)

    def controlnet_source(self):
        """The resolved `controlnet` setting, or None when none is configured."""
        if not self.controlnet:
            return None
        from deployments.weights.controlnet_source import resolve_controlnet

        return resolve_controlnet(self.controlnet, self.cache_dir)

    def torch_device(self) -> torch.device:
        from deployments.weights.loading import resolve_device

        return resolve_device(self.device)

    def dtype(self) -> torch.dtype:
        """bf16 on the GPU (fp8 applies to the DiT's linear layers on top); float32 on the CPU."""
        import torch

        return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32

    def compile_cache_dir(self) -> str:
        """Compiled DiT artifacts live beside the checkpoints so later replicas on the node reuse them."""
        root = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        return str(root / "compile")

    def warmup_pixels(self) -> list[tuple[int, int]]:
        return [parse_size(size) for size in self.warmup_sizes]
