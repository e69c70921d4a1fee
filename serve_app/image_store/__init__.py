"""Image stores for `response_format: "url"`: a local directory served by the Ingress, or an
S3-compatible bucket with presigned URLs, behind one small interface (`ImageStore`)."""

from __future__ import annotations

from pathlib import Path

from serve_app.image_store.base import (
    CONTENT_TYPES,
    NAME_PATTERN,
    ImageName,
    ImageStore,
    StoredImage,
    StoreError,
    StoreFull,
    parse_name,
)
from serve_app.image_store.config import ImageStoreConfig, S3Options
from serve_app.image_store.local import FILES_ROUTE, LocalDirectoryStore

__all__ = [
    "CONTENT_TYPES", "FILES_ROUTE", "NAME_PATTERN", "ImageName", "ImageStore", "ImageStoreConfig",
    "LocalDirectoryStore", "S3Options", "StoredImage", "StoreError", "StoreFull", "build_store", "parse_name",
]


def default_directory() -> Path:
    from deployments.weights.model_source import default_cache_dir

    return default_cache_dir() / "images"


def build_store(config: ImageStoreConfig) -> ImageStore:
    """The store `config` describes, ready to use (the local directory exists; a bucket is not
    contacted until the first image, so a replica starts while the bucket is briefly unreachable)."""
    if config.kind == "s3":
        from serve_app.image_store.s3 import S3ImageStore

        s3 = config.s3
        return S3ImageStore(s3.bucket, config.url_ttl_s, endpoint_url=s3.endpoint_url, prefix=s3.prefix,
                            region=s3.region, public_endpoint_url=s3.public_endpoint_url,
                            virtual_hosted_style=s3.virtual_hosted_style, timeout_s=s3.timeout_s)
    directory = Path(config.directory) if config.directory else default_directory()
    return LocalDirectoryStore(directory, config.url_ttl_s, config.max_bytes, config.public_base_url)
