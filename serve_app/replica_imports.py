"""The model-side modules the Ingress's request path uses, each imported where it is used.

The builder imports the Ingress's module for its class, on a node that runs no model (`serve deploy`
builds the application in Serve's controller), so nothing the builder reaches imports torch at module
level. The Ingress replica imports them all in its constructor (`import_request_path`, through
`ImagePipeline`), before it reports ready, so that no request pays for an import.
"""

from __future__ import annotations

import importlib

REQUEST_PATH = (
    "torch",
    "imagecodecs",                      # serve_app.image_io's JPEG writer
    "deployments.denoiser.loop",        # an edit's first step (serve_app.backlog, pending_work)
    "deployments.inpaint_mask",         # masks, an edit's default strength and the pasted-back upload
    "deployments.denoiser.lora.library",  # adapter names and their multiplexed set IDs
    "deployments.denoiser.control",     # control images' channels and default scale
)


def import_request_path() -> None:
    """Imports every module of `REQUEST_PATH` (a no-op for those already imported)."""
    for name in REQUEST_PATH:
        importlib.import_module(name)
