"""What every image store does: keep an encoded image until it expires and hand out a URL to it.

An image's name is its capability: `<expiry, unix seconds>-<43 chars of secrets.token_urlsafe(32)>.<format>`,
256 random bits, so a URL cannot be guessed, and it says itself when it stops working (the expiry
is fixed when the image is written; a later change of `url_ttl_s` does not move it). Every name that
comes from outside is matched against `NAME_PATTERN` before anything else: no separators, no dots but
the extension's, so a name can never walk out of the store.
"""

from __future__ import annotations

import abc
import asyncio
import re
import secrets
import time
from dataclasses import dataclass

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 URL-safe characters
NAME_PATTERN = re.compile(r"\A(?P<expires>[0-9]{10})-(?P<token>[A-Za-z0-9_-]{43})\.(?P<format>png|jpeg|webp)\Z")


class StoreError(Exception):
    """The store could not keep an image (unreachable, refused, disk full): the request is a 503."""

    code = "image_store_unavailable"


class StoreFull(StoreError):
    """The local store's quota is used up by images that have not expired yet."""

    code = "image_store_full"


@dataclass(frozen=True)
class StoredImage:
    name: str
    url: str
    expires_at: int  # unix seconds


@dataclass(frozen=True)
class ImageName:
    name: str
    expires_at: int
    format: str

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


def new_name(fmt: str, ttl_s: float, now: float | None = None) -> ImageName:
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"no image store format {fmt!r}")
    expires = int((time.time() if now is None else now) + ttl_s)
    return ImageName(f"{expires:010d}-{secrets.token_urlsafe(TOKEN_BYTES)}.{fmt}", expires, fmt)


def parse_name(name: str) -> ImageName | None:
    """The name's parts when it is one the store could have made, else None."""
    match = NAME_PATTERN.match(name) if isinstance(name, str) else None
    if match is None:
        return None
    return ImageName(name, int(match["expires"]), match["format"])


class ImageStore(abc.ABC):
    """Where `response_format: "url"` images go. `put` returns only once the image is complete and
    readable at its URL; an image is never visible half-written."""

    kind: str
    ttl_s: float

    @abc.abstractmethod
    async def put(self, data: bytes, fmt: str, request_base_url: str | None = None) -> StoredImage:
        """Stores one encoded image. `request_base_url` is the base URL the client used (the local
        store's URLs point back at the server; `public_base_url` overrides it). Raises StoreError."""

    @abc.abstractmethod
    async def delete(self, name: str) -> None:
        """Removes an image if present (best effort)."""

    @abc.abstractmethod
    async def sweep(self, now: float | None = None) -> int:
        """Removes expired images (and abandoned temporary files); returns how many went."""

    @property
    def sweep_interval_s(self) -> float:
        return max(1.0, min(60.0, self.ttl_s / 4))

    async def put_all(self, images: list[tuple[bytes, str]], request_base_url: str | None = None
                      ) -> list[StoredImage]:
        """All of a response's images, or none: when one fails, those already stored are deleted and
        the StoreError is raised, so a client never gets a response with a missing image."""
        results = await asyncio.gather(*(self.put(data, fmt, request_base_url) for data, fmt in images),
                                       return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is None:
            return list(results)
        await asyncio.gather(*(self.delete(r.name) for r in results if isinstance(r, StoredImage)),
                             return_exceptions=True)
        if isinstance(failure, StoreError):
            raise failure
        raise StoreError(f"the image store failed: {type(failure).__name__}") from failure
