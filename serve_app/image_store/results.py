"""A finished request's images by reference: stored, and their bytes swapped for URLs."""

from __future__ import annotations

from dataclasses import replace

from serve_app.image_store.base import ImageStore
from serve_app.protocol import ImageResult


async def by_reference(result: ImageResult, store: ImageStore, request_base_url: str | None = None) -> ImageResult:
    """`result` with each image stored and carried as its `url` (its `data` emptied). All or nothing:
    when the store fails, nothing is returned and what was written is deleted (StoreError)."""
    stored = await store.put_all([(image.data, image.format) for image in result.images], request_base_url)
    images = [replace(image, data=b"", url=item.url) for image, item in zip(result.images, stored, strict=True)]
    return replace(result, images=images)
