"""A separate Serve application that uses zimage through its Python handle API (used by the tests)."""

from __future__ import annotations

from ray import serve

from serve_app.protocol import ImageRequest, ImageResult


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class HandleClient:
    def __init__(self, app_name: str):
        self.app_name = app_name

    async def __call__(self, prompt: str, n: int) -> dict:
        handle = serve.get_app_handle(self.app_name)
        result: ImageResult = await handle.generate.remote(
            ImageRequest(prompt=prompt, n=n, width=512, height=512, steps=2, seed=7)
        )
        return {
            "count": len(result.images),
            "seeds": [image.seed for image in result.images],
            "formats": [image.format for image in result.images],
            "sizes": [[image.width, image.height] for image in result.images],
            "heads": [list(image.data[:4]) for image in result.images],
        }
