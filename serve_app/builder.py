"""`build_app(args) -> Application`: the whole request path, in one place.

    HTTP / handle -> Ingress -> PromptStyler -> TextEncoder -> Denoiser -> VaeDecoder -> Ingress
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.denoiser import Denoiser
from deployments.prompt_styler import PromptStyler
from deployments.text_encoder import TextEncoder
from deployments.vae import VaeDecoder
from serve_app.config import AppArgs
from serve_app.ingress import Ingress


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validates `args` once (serve_config.yaml's `args`, or `serve run ... key=value`) and binds the graph."""
    config = AppArgs.from_args(args)
    source = config.model_settings().source()  # fails here, before any replica starts, on a bad model
    settings = config.model_settings().model_dump()

    styler = PromptStyler.options(**config.deployment_options("prompt_styler")).bind()
    text_encoder = TextEncoder.options(**config.deployment_options("text_encoder")).bind(settings)
    denoiser = Denoiser.options(**config.deployment_options("denoiser")).bind(settings, config.denoiser_scheduling)
    vae = VaeDecoder.options(**config.deployment_options("vae")).bind(settings)
    return Ingress.options(**config.deployment_options("ingress")).bind(
        styler,
        text_encoder,
        denoiser,
        vae,
        model_name=source.name,
        random_weights=source.random_weights,
    )
