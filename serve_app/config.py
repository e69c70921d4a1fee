"""The application's configuration: serve_config.yaml's `args` (or `serve run ... key=value`), validated once.

Everything the builder needs flows from `AppArgs`: the model settings every stage shares, the API's
limits, the style presets, the Denoiser's scheduling policy and per-stage deployment options.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.geometry import MAX_SIDE, MIN_SIDE
from deployments.denoiser.policies import SchedulingPolicy
from deployments.style.presets import DEFAULT_STYLE, configured_table
from deployments.settings import ModelSettings
from deployments.runtime.stage import deep_merge
from serve_app.image_store.config import ImageStoreConfig, ingress_replicas_problem
from serve_app.tenants.keys import (
    API_KEYS_ENV, API_KEYS_FILE_ENV, DIGEST_PATTERN, DIGEST_PREFIX, TenantKey, distinct_problem, labelled, node_keys,
    with_node_keys,
)

# Ray Serve deployment options a stage's entry in `args` may set, named as in a Serve config file.
SERVE_OPTION_NAMES = (
    "num_replicas", "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "health_check_period_s",
    "health_check_timeout_s", "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "max_replicas_per_node",
)


class StageOptions(BaseModel):
    """One stage's overrides in Ray Serve's own field names; whatever is unset keeps the defaults the
    stage declares next to its code. `ray_actor_options` merge key by key over the stage's, and
    `user_config` over its live-config defaults. (A Serve config file's `deployments` entries work
    too, and are the usual place; these are for `serve run serve_app:build_app denoiser.x=y`.)"""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(None, ge=-1)
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)
    graceful_shutdown_wait_loop_s: float | None = Field(None, gt=0)
    max_replicas_per_node: int | None = Field(None, ge=1)
    user_config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self):
        if self.autoscaling_config is not None and isinstance(self.num_replicas, int):
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def serve_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SERVE_OPTION_NAMES if getattr(self, name) is not None}


class ApiLimits(BaseModel):
    """What the HTTP API accepts; the ingress enforces these before any stage sees a request."""

    # hide_input_in_errors: a refused live update must not repeat a digest into the logs or status.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    served_model_name: str = "z-image-turbo"
    api_key_sha256: tuple[str, ...] = ()
    """SHA-256 of each accepted key without a name: the keys themselves never reach logs, status or
    user_config. Such keys are unlimited, with weight 1, and share the label `unnamed`."""
    keys: tuple[TenantKey, ...] = ()
    """Named keys: `{name, digest, max_in_flight, images_per_minute, weight}` (serve_app.tenants.keys).
    A live override's entries merge by name into these, so a limit changes without its digest."""
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
    max_loras_per_request: int = Field(4, ge=0, le=16)
    release_window: int | None = Field(24, ge=1)
    """Images that the Ingress replicas together keep in flight past the Ingress per running Denoiser
    replica; the rest of the admitted work waits in the Ingress and is released by fair share
    between keys (serve_app.tenants.release). Below the Denoiser's `max_ongoing_requests` (32
    shipped), so that nothing released waits in Ray's router queue. None: no holding back, every
    admitted request goes on at once, first come first served."""

    @model_validator(mode="after")
    def _steps_in_range(self):
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError("need min_steps <= default_steps <= max_steps")
        return self

    @field_validator("api_key_sha256")
    @classmethod
    def _digest_shape(cls, digests: tuple[str, ...]) -> tuple[str, ...]:
        for index, digest in enumerate(digests):
            if not DIGEST_PATTERN.match(digest):
                raise ValueError(f"api_key_sha256[{index}] is not a SHA-256 digest (64 lowercase hex, from "
                                 "`printf %s KEY | sha256sum`); raw keys go in the replicas' environment")
        return digests

    @model_validator(mode="after")
    def _keys_distinct(self):
        problem = distinct_problem(labelled("api.keys", self.keys), labelled("api.api_key_sha256", self.api_key_sha256))
        if problem:
            raise ValueError(problem)
        return self

    def with_env_keys(self) -> "ApiLimits":
        """Raw keys come only from the Ingress replica's node: its environment (ZIMAGE_API_KEYS, comma
        separated) or a file named by ZIMAGE_API_KEYS_FILE (one key per line), each `key` or
        `name:key`; they never pass through Ray (args, user_config, logs, `serve status`), which sees
        their digests at most. A name given on the node takes the limits of config's entry of that name."""
        keys, unnamed = with_node_keys(self.keys, self.api_key_sha256, node_keys())
        return self.model_copy(update={"keys": keys, "api_key_sha256": unnamed})


def config_problem(exc: Exception) -> str:
    """Why a config does not validate, on one line: each problem with where it is (a log line, a status)."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in error['loc']) or 'config'}: "
                         f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())
    return str(exc)


def split_keys(value: str | tuple | list) -> tuple:
    """`api_keys` as one comma-separated string, or a list whose strings are stripped and mappings kept."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(k.strip() if isinstance(k, str) else k for k in items if not isinstance(k, str) or k.strip())


class AppArgs(ModelSettings):
    """ModelSettings (what every stage loads) plus the API, styles, scheduling and deployment options."""

    # hide_input_in_errors: an error about a key must not repeat it into the controller's status.
    model_config = ConfigDict(extra="forbid", frozen=False, hide_input_in_errors=True)

    api_keys: tuple[str | TenantKey, ...] = ()
    """Accepted keys by digest: `sha256:<hex>` for a key without a name, or a named key's mapping
    `{name, digest, max_in_flight, images_per_minute, weight}`; raw keys belong in the replicas'
    environment."""
    api: ApiLimits = Field(default_factory=ApiLimits)
    styles: dict[str, str] | None = None
    replace_styles: bool = False
    default_style: str = DEFAULT_STYLE
    denoiser_scheduling: SchedulingPolicy = "continuous"
    image_store: ImageStoreConfig = Field(default_factory=ImageStoreConfig)
    """Where `response_format: "url"` images go (serve_app.image_store): a local directory or a bucket."""

    prompt_styler: StageOptions = Field(default_factory=StageOptions)
    text_encoder: StageOptions = Field(default_factory=StageOptions)
    denoiser: StageOptions = Field(default_factory=StageOptions)
    vae: StageOptions = Field(default_factory=StageOptions)
    ingress: StageOptions = Field(default_factory=StageOptions)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        return split_keys(value) if isinstance(value, (str, list, tuple)) else value

    @field_validator("api_keys")
    @classmethod
    def _digests_only(cls, keys: tuple) -> tuple:
        for key in keys:
            if isinstance(key, str) and not (key.startswith(DIGEST_PREFIX)
                                             and DIGEST_PATTERN.match(key.removeprefix(DIGEST_PREFIX))):
                raise ValueError(
                    "api_keys takes digests only, as 'sha256:<64 lowercase hex>' (e.g. from "
                    "`printf %s KEY | sha256sum`): args reach Ray's logs and status. Give raw keys to the "
                    f"Ingress replicas through {API_KEYS_ENV} (comma separated) or a file named by "
                    f"{API_KEYS_FILE_ENV} (one key per line)."
                )
        return keys

    @model_validator(mode="after")
    def _keys_distinct(self):
        self.ingress_limits()  # a name or a digest twice, across `api_keys` and `api`, refuses the build
        return self

    def ingress_limits(self) -> ApiLimits:
        """`api` with the keys of `api_keys` added (named ones to `api.keys`, digests to `api_key_sha256`)."""
        digests = [(f"api_keys[{i}]", k.removeprefix(DIGEST_PREFIX)) for i, k in enumerate(self.api_keys)
                   if isinstance(k, str)]
        named = [(f"api_keys[{i}]", k) for i, k in enumerate(self.api_keys) if isinstance(k, TenantKey)]
        problem = distinct_problem(labelled("api.keys", self.api.keys) + named,
                                   labelled("api.api_key_sha256", self.api.api_key_sha256) + digests)
        if problem:
            raise ValueError(problem)
        return self.api.model_copy(update={"api_key_sha256": self.api.api_key_sha256 + tuple(d for _, d in digests),
                                           "keys": self.api.keys + tuple(k for _, k in named)})

    @model_validator(mode="after")
    def _styles_are_valid(self):
        configured_table(self.styles, self.replace_styles, self.default_style)
        return self

    @model_validator(mode="after")
    def _every_ingress_serves_its_urls(self):
        problem = ingress_replicas_problem(self.image_store, self.ingress.num_replicas,
                                           self.ingress.autoscaling_config)
        if problem:
            raise ValueError(problem)
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
        """Whether replicas get GPU shares: `auto` asks the Ray cluster (the builder runs on the head
        node, which may have no GPU of its own), or, when Ray is not running yet (`serve run` builds
        the application first), the GPUs Ray will find on this machine (`local_gpus`)."""
        if self.device != "auto":
            return self.device == "cuda"
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0
        return local_gpus() > 0

    def stage_user_config(self, stage: str) -> dict[str, Any]:
        """The live config `args` give a stage, before its own defaults fill the rest."""
        derived: dict[str, Any] = {}
        if stage == "prompt_styler":
            derived = {"default_style": self.default_style, "replace_styles": self.replace_styles,
                       "styles": self.styles or {}}
        elif stage == "denoiser":
            derived = {"scheduling": self.denoiser_scheduling}
        elif stage == "ingress":
            derived = {"api": self.ingress_limits().model_dump(mode="json")}
        return deep_merge(derived, getattr(self, stage).user_config)


def local_gpus() -> int:
    """The GPUs `ray.init` registers on this machine, counted as Ray counts them (NVML, within
    CUDA_VISIBLE_DEVICES): the builder asks without importing torch, which only replicas need."""
    from ray._private.accelerators import get_accelerator_manager_for_resource

    manager = get_accelerator_manager_for_resource("GPU")
    count = manager.get_current_node_num_accelerators()
    visible = manager.get_current_process_visible_accelerator_ids()
    return count if visible is None else min(count, len(visible))
