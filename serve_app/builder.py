"""`build_app(args) -> Application`: the whole request path, in one place.

    HTTP / handle -> Ingress -> PromptStyler -> TextEncoder -> Denoiser -> VaeDecoder -> Ingress

Each stage declares its own defaults next to its code (`@serve.deployment(...)` options and its
live-config model); the builder lays the user's overrides from `args` over them, gives GPU shares
only where a GPU is in use, and binds every stage to its complete live config. A Serve config file's
`deployments` entries then apply on top, as Serve applies them to any application.

Logs: each request leaves one line, the Ingress's access line (serve_app.access_log). Ray's own
per-request lines (each replica's for every HTTP request and stage call, five more per image) follow
Serve's `logging_config`. A config file sets it (serve_config.yaml turns them off); under
`serve run serve_app:build_app` nothing can, since the builder runs in the command's own process before
Ray starts, so there, and only there, the builder turns them off on every deployment. With a config
file the controller runs the builder, which then sets nothing, leaving the file's `logging_config`
(application or deployment) in charge.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from deployments.denoiser.deployment import Denoiser
from deployments.style.deployment import PromptStyler
from deployments.runtime.stage import deep_merge
from deployments.text_encoder.deployment import TextEncoder
from deployments.vae.deployment import VaeDecoder
from serve_app.config import AppArgs
from serve_app.ingress import Ingress
from serve_app.sigterm import stop_on_sigterm_as_on_ctrl_c

logger = logging.getLogger("ray.serve")


def stage_options(deployment: Deployment, args: AppArgs, stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Serve `.options()`, complete live config) for one stage: its defaults, then `args`' overrides."""
    overrides = getattr(args, stage)
    actor = deep_merge(deployment.ray_actor_options or {}, overrides.ray_actor_options)
    if not args.uses_gpu():
        actor["num_gpus"] = 0
    live = deployment.func_or_class.config_model.model_validate(args.stage_user_config(stage))
    user_config = live.model_dump(mode="json")
    return {"ray_actor_options": actor, **overrides.serve_options(), "user_config": user_config}, user_config


# Ray Serve's per-request lines off, for `serve run serve_app:build_app` (the module's docstring says why).
RAY_ACCESS_LOG_OFF = {"enable_access_log": False}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` once (serve_config.yaml's `args`, or `serve run ... key=value`) and binds the graph.
    Logs one line with its seconds (benchmarks/start_budget.py reads it: the application's import is
    what comes before it)."""
    started = time.perf_counter()
    config = AppArgs.from_args(args)
    in_serve_run_driver = stop_on_sigterm_as_on_ctrl_c()  # there, SIGTERM stops it as Ctrl-C does
    source = config.model_settings().source()  # fails here, before any replica starts, on a bad model
    config.model_settings().controlnet_source()  # and on a bad controlnet
    settings = config.model_settings().model_dump()

    def bind(deployment: Deployment, stage: str, *init_args: Any, **init_kwargs: Any) -> Application:
        options, live_config = stage_options(deployment, config, stage)
        if in_serve_run_driver:
            options["logging_config"] = RAY_ACCESS_LOG_OFF
        return deployment.options(**options).bind(*init_args, base_config=live_config, **init_kwargs)

    styler = bind(PromptStyler, "prompt_styler")
    text_encoder = bind(TextEncoder, "text_encoder", settings)
    denoiser = bind(Denoiser, "denoiser", settings)
    vae = bind(VaeDecoder, "vae", settings)
    app = bind(Ingress, "ingress", styler, text_encoder, denoiser, vae,
               model_name=source.name, random_weights=source.random_weights,
               image_store=config.image_store.model_dump(mode="json"),
               lora_settings=config.model_settings().lora_fields(),
               controlnet=config.controlnet)
    logger.info("zimage-serve application built in %.2f s (build_app)", time.perf_counter() - started)
    return app
