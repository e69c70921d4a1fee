"""The application's configuration: serve_config.yaml's `args` (or `serve run ... key=value`), validated once.

Everything the builder needs flows from `AppArgs`: the model settings every stage shares, the API's
limits, the style presets, the Denoiser's scheduling policy and per-stage deployment options.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.core.image_sizes import MAX_SIDE, MIN_SIDE
from deployments.core.scheduling import SchedulingPolicy
from deployments.core.styles import DEFAULT_STYLES, merge_styles
from deployments.settings import ModelSettings

STAGES = ("prompt_styler", "text_encoder", "denoiser", "vae", "ingress")
GPU_STAGES = ("text_encoder", "denoiser", "vae")

# A share of one GPU per stage when none is configured: the DiT does nearly all of the work.
DEFAULT_GPU_FRACTIONS = {"text_encoder": 0.15, "denoiser": 0.6, "vae": 0.2}

# Ray schedules by these; they are small so that the whole graph fits on a 2-core machine.
DEFAULT_NUM_CPUS = {"prompt_styler": 0.1, "text_encoder": 0.25, "denoiser": 0.25, "vae": 0.25, "ingress": 0.25}

API_KEYS_ENV = "ZIMAGE_API_KEYS"


class StageOptions(BaseModel):
    """Ray Serve options for one deployment; unset fields keep the stage's defaults."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    num_gpus: float | None = Field(None, ge=0, le=8)
    num_cpus: float | None = Field(None, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)
    health_check_period_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)
    user_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self):
        if self.autoscaling_config is not None and isinstance(self.num_replicas, int):
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


class ApiLimits(BaseModel):
    """What the HTTP API accepts; the ingress enforces these before any stage sees a request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_name: str = "z-image-turbo"
    api_key_sha256: tuple[str, ...] = ()
    """SHA-256 of each accepted key: the keys themselves never reach logs, status or user_config."""
    max_images_per_request: int = Field(10, ge=1, le=64)
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(16, ge=1, le=100)
    default_steps: int = Field(8, ge=1)
    max_pixels: int = Field(MAX_SIDE * MAX_SIDE, ge=MIN_SIDE * MIN_SIDE)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_upload_bytes: int = Field(20 << 20, ge=1024)
    max_upload_pixels: int = Field(64 << 20, ge=MIN_SIDE * MIN_SIDE)
    max_inflight_requests: int = Field(256, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _steps_in_range(self):
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError("need min_steps <= default_steps <= max_steps")
        return self

    def with_env_keys(self) -> "ApiLimits":
        """Keys may also come from the environment of the Ingress replicas (operator concern)."""
        extra = hash_keys(split_keys(os.environ.get(API_KEYS_ENV, "")))
        return self.model_copy(update={"api_key_sha256": tuple(dict.fromkeys(self.api_key_sha256 + extra))})


def split_keys(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(k.strip() for k in items if k and k.strip())


def hash_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(hashlib.sha256(k.encode()).hexdigest() for k in keys)


class AppArgs(ModelSettings):
    """ModelSettings (what every stage loads) plus the API, styles, scheduling and deployment options."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    api_keys: tuple[str, ...] = ()
    api: ApiLimits = Field(default_factory=ApiLimits)
    styles: dict[str, str] | None = None
    replace_styles: bool = False
    default_style: str = "None"
    denoiser_scheduling: SchedulingPolicy = "continuous"

    prompt_styler: StageOptions = Field(default_factory=StageOptions)
    text_encoder: StageOptions = Field(default_factory=StageOptions)
    denoiser: StageOptions = Field(default_factory=StageOptions)
    vae: StageOptions = Field(default_factory=StageOptions)
    ingress: StageOptions = Field(default_factory=StageOptions)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        return split_keys(value) if isinstance(value, (str, list, tuple)) else value

    @model_validator(mode="after")
    def _styles_are_valid(self):
        table = merge_styles(DEFAULT_STYLES, self.styles, replace=self.replace_styles)
        if self.default_style not in table:
            raise ValueError(f"default_style {self.default_style!r} is not among the styles: {', '.join(table)}")
        return self

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppArgs":
        """Accepts nested dicts (serve_config.yaml) and dotted `key=value` strings (`serve run`)."""
        nested: dict[str, Any] = {}
        for key, value in (args or {}).items():
            target = nested
            parts = key.split(".")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = value
        return cls.model_validate(nested)

    def model_settings(self) -> ModelSettings:
        return ModelSettings(**self.model_dump(include=set(ModelSettings.model_fields)))

    def uses_gpu(self) -> bool:
        if self.device == "cpu":
            return False
        if self.device == "cuda":
            return True
        import torch

        return torch.cuda.is_available()

    def styler_user_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"default_style": self.default_style, "replace_styles": self.replace_styles}
        if self.styles:
            config["styles"] = self.styles
        return {**config, **self.prompt_styler.user_config}

    def deployment_options(self, stage: str) -> dict[str, Any]:
        """Ray Serve `.options()` for a stage: GPU fractions only when a GPU is in use."""
        options: StageOptions = getattr(self, stage)
        actor: dict[str, Any] = {}
        if stage in GPU_STAGES:
            gpus = options.num_gpus if options.num_gpus is not None else DEFAULT_GPU_FRACTIONS[stage]
            actor["num_gpus"] = gpus if self.uses_gpu() else 0
        actor["num_cpus"] = options.num_cpus if options.num_cpus is not None else DEFAULT_NUM_CPUS[stage]
        result: dict[str, Any] = {"ray_actor_options": actor}
        for name in ("num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests",
                     "health_check_period_s", "graceful_shutdown_timeout_s"):
            value = getattr(options, name)
            if value is not None:
                result[name] = value
        user_config = {
            "prompt_styler": self.styler_user_config,
            "ingress": self.ingress_user_config,
        }.get(stage, lambda: options.user_config)()
        if user_config:
            result["user_config"] = user_config
        return result

    def ingress_user_config(self) -> dict[str, Any]:
        """API limits and key hashes travel as live config: keys rotate without a restart."""
        limits = self.api.model_copy(update={"api_key_sha256": self.api.api_key_sha256 + hash_keys(self.api_keys)})
        return {"api": limits.model_dump(mode="json"), **self.ingress.user_config}
