"""`args.image_store`: where `response_format: "url"` images go and how long their URLs live.

    image_store:
      kind: local                 # or s3
      url_ttl_s: 3600             # how long a URL works (S3's presigned URLs: at most 7 days)
      public_base_url: null       # the address clients reach the server at, e.g. behind a proxy
      directory: null             # local: default <ZIMAGE_CACHE_DIR>/images on each Ingress node
      max_bytes: 2147483648       # local: the directory's quota
      shared_directory: false     # local: the directory is one file system mounted on every Ingress node
      s3: {bucket, endpoint_url, prefix, region, public_endpoint_url, virtual_hosted_style}

Secrets never go here: args reach Ray's logs, `serve status` and the dashboard. A credential-like
field is refused with a message that says where credentials come from.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_PRESIGNED_TTL_S = 7 * 24 * 3600  # SigV4's limit
CREDENTIAL_WORDS = re.compile(r"secret|access_key|accesskey|session_token|password|credential|token", re.I)
CREDENTIALS_HINT = ("credentials never go in args (they reach Ray's logs and status): give the Ingress "
                    "replicas' nodes AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), a "
                    "web identity token or an instance role")
BUCKET_PATTERN = re.compile(r"\A[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


def _http_url(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{field} must be an http(s) URL, got {value!r}")
    if parts.username or parts.password:
        raise ValueError(f"{field} must not carry a user or password: {CREDENTIALS_HINT}")
    if parts.query or parts.fragment:
        raise ValueError(f"{field} must not have a query or fragment")
    return value.rstrip("/")


class _StoreOptions(BaseModel):
    """Strict, frozen options that refuse credential-like fields before anything else reads them."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and CREDENTIAL_WORDS.search(key):
                    raise ValueError(f"image_store field {key!r} refused: {CREDENTIALS_HINT}")
        return data


class S3Options(_StoreOptions):

    bucket: str
    endpoint_url: str | None = None
    """None: AWS S3 in `region`; else e.g. `https://minio.internal:9000` (path-style requests)."""
    prefix: str = "zimage-images"
    region: str | None = None
    public_endpoint_url: str | None = None
    """The endpoint clients reach, when it differs from the one the replicas use; URLs are signed for it."""
    virtual_hosted_style: bool = False
    timeout_s: float = Field(30.0, gt=0, le=600)

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not BUCKET_PATTERN.match(value):
            raise ValueError("bucket must be an S3 bucket name (3-63 lowercase letters, digits, '.' and '-')")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if value and any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError("prefix must be a plain key prefix like 'zimage/images'")
        return value

    @field_validator("endpoint_url", "public_endpoint_url")
    @classmethod
    def _urls(cls, value: str | None, info) -> str | None:
        return _http_url(value, info.field_name)


class ImageStoreConfig(_StoreOptions):
    kind: Literal["local", "s3"] = "local"
    url_ttl_s: int = Field(3600, ge=10, le=MAX_PRESIGNED_TTL_S)
    public_base_url: str | None = None
    directory: str | None = None
    max_bytes: int = Field(2 << 30, ge=1 << 20)
    shared_directory: bool = False
    s3: S3Options | None = None

    @field_validator("public_base_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return _http_url(value, "public_base_url")

    @model_validator(mode="after")
    def _kind_has_its_settings(self):
        if self.kind == "s3" and self.s3 is None:
            raise ValueError("image_store.kind 's3' needs image_store.s3.bucket (and endpoint_url for a "
                             "server other than AWS S3)")
        return self

    @property
    def serves_every_replica(self) -> bool:
        """Whether any Ingress replica can serve any URL: a bucket, or one directory on every node."""
        return self.kind == "s3" or self.shared_directory


def ingress_replicas_problem(config: ImageStoreConfig, num_replicas: int | str | None,
                             autoscaling: dict[str, Any] | None) -> str | None:
    """Why this Ingress scaling cannot serve every URL, or None. A local directory lives on one node:
    a URL written by one replica would be a 404 on a replica elsewhere."""
    if config.serves_every_replica:
        return None
    most = 1
    if autoscaling is not None or num_replicas == "auto":
        most = int((autoscaling or {}).get("max_replicas", 100 if num_replicas == "auto" else 1))
    elif isinstance(num_replicas, int):
        most = num_replicas
    if most <= 1:
        return None
    return (f"the Ingress may run {most} replicas, but image_store.kind 'local' keeps images on each replica's "
            "node, so a URL from one replica would not be found on another. Use image_store.kind 's3' (a "
            "bucket every replica writes to), or mount one directory on every Ingress node and set "
            "image_store.directory to it with image_store.shared_directory: true, or run one Ingress replica.")
