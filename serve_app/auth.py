"""API keys: `Authorization: Bearer <key>`, checked against the SHA-256 digests the server accepts.

Only digests are held (serve_app.tenants.keys); the comparison takes the same time whatever the key.
A good key gives its tenant (its name, limits and weight); with no keys configured every request
passes, as the tenant `anonymous`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.responses import Response

from serve_app.errors import ApiError, bad_request, error_response
from serve_app.tenants.keys import ANONYMOUS, UNNAMED, KeyTable, Tenant


def authorize(headers: Mapping[str, str], keys: KeyTable) -> Tenant:
    """The request's tenant; a 401 `ApiError` unless its bearer key is one of `keys` (when any are set)."""
    if not keys.required:
        return ANONYMOUS
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    tenant = keys.for_key(token.strip())
    if tenant is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return tenant


def if_authorized(headers: Mapping[str, str], keys: KeyTable, page: Callable[[], Response]) -> Response:
    """`page()` for a request with a good key, else the 401 (the API docs follow the key setting)."""
    try:
        authorize(headers, keys)
    except ApiError as exc:
        return error_response(exc)
    return page()


def declared_tenant(name: str | None, keys: KeyTable) -> Tenant:
    """A handle caller's tenant, trusted as declared (a handle call carries no key): the named key's
    limits and weight; None is `anonymous`. A name no key has is a 400, never a tenant of its own."""
    if name is None or name == ANONYMOUS.name:
        return ANONYMOUS
    if name == UNNAMED.name:
        return UNNAMED
    tenant = keys.named(name)
    if tenant is None:
        raise bad_request(f"Unknown tenant {name[:80]!r}: a handle call's tenant must be the name of a key in "
                          "api.keys (or None).", param="tenant", code="unknown_tenant")
    return tenant
