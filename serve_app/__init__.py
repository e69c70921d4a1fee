"""zimage-serve: Z-Image-Turbo on Ray Serve behind an OpenAI-compatible images API.

The application: `builder` (`build_app`), `config` (its args), `ingress` (the routes and the handle
API), `protocol` (request, response and error models), `pipeline` and `planning` (a request through
the stages), and the Ingress's parts: `auth`, `admission`, `request_io`, `image_io`, `masks`,
`control` (a request's control image), `responses`, `streaming`, `image_store/`, `retry`, `readiness`, `errors`, `access_log`, `metrics`,
`web/` (the page) and `dashboards/`.

`serve_app:build_app` is the application's import path. It is imported on first use, so that a
client importing `serve_app.protocol` (pydantic only) does not load Ray, torch or diffusers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from serve_app.builder import build_app

        return build_app
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
