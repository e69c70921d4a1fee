"""API keys: `Authorization: Bearer <key>`, checked against the SHA-256 digests the server accepts.

Only digests are held (serve_app.config.ApiLimits.with_env_keys); the comparison takes the same time
whatever the key, and with no digests configured every request passes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping

from starlette.responses import Response

from serve_app.errors import ApiError, error_response


def authorize(headers: Mapping[str, str], accepted: tuple[str, ...]) -> None:
    """Raises a 401 `ApiError` unless the request's bearer key hashes to one of `accepted`."""
    if not accepted:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    digest = hashlib.sha256(token.strip().encode()).hexdigest().encode()
    if not any(hmac.compare_digest(digest, known.encode()) for known in accepted):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def if_authorized(headers: Mapping[str, str], accepted: tuple[str, ...], page: Callable[[], Response]) -> Response:
    """`page()` for a request with a good key, else the 401 (the API docs follow the key setting)."""
    try:
        authorize(headers, accepted)
    except ApiError as exc:
        return error_response(exc)
    return page()
