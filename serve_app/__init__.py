"""zimage-serve: Z-Image-Turbo on Ray Serve behind an OpenAI-compatible images API."""

from serve_app.builder import build_app

__all__ = ["build_app"]
