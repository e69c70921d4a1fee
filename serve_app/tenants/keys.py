"""API keys as tenants: a key may carry a name, its own limits and its weight in the share of the GPU.

Keys come from three places, which add up:
- `api.keys` in the Ingress's live config (and the app's `api_keys` as mappings): entries
  `{name, digest, max_in_flight, images_per_minute, weight}`. An entry without `digest` gives the
  limits of a key that the node supplies under that name, or of a tenant only handle callers name;
- `api.api_key_sha256` (and `api_keys` as `sha256:<hex>` strings): keys without a name;
- the Ingress replica's node: `ZIMAGE_API_KEYS` (comma separated) and the file named by
  `ZIMAGE_API_KEYS_FILE` (one per line), each entry `key` or `name:key`.

A key without a name is unlimited with weight 1, and all such keys are one tenant, `unnamed`;
requests where no key is needed are `anonymous`. A name or a digest given twice is refused, naming
the entries. Names are what logs, metrics and errors show; a key or its digest never is.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from deployments.contracts import TenantTag

API_KEYS_ENV = "ZIMAGE_API_KEYS"
API_KEYS_FILE_ENV = "ZIMAGE_API_KEYS_FILE"  # a file on the node: one key per line
DIGEST_PREFIX = "sha256:"
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit (no spaces)"
ANONYMOUS_NAME = "anonymous"
UNNAMED_NAME = "unnamed"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TenantKey(BaseModel):
    """One named key in config; a limit left out is no limit. The limits are the whole server's: with
    several Ingress replicas each enforces its share (serve_app.tenants.ledger)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    digest: str | None = None
    """SHA-256 of the key, `sha256:<hex>` (or the bare hex); None: the key comes from the node."""
    max_in_flight: int | None = None
    """Requests of this key admitted at once (waiting in the Ingress or running)."""
    images_per_minute: int | None = None
    """Images this key may ask for per minute: a token bucket of that size, refilled continuously."""
    weight: float = 1.0
    """Its share of the GPU against other keys with work waiting: twice the weight, twice the steps."""

    @field_validator("name")
    @classmethod
    def _name_shape(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(f"key name {name[:80]!r} is not valid: {NAME_RULE}")
        if name in (ANONYMOUS_NAME, UNNAMED_NAME):
            raise ValueError(f"key name {name!r} is reserved (it labels requests without a named key)")
        return name

    @field_validator("digest")
    @classmethod
    def _digest_shape(cls, digest: str | None, info: ValidationInfo) -> str | None:
        if digest is None:
            return None
        bare = digest.removeprefix(DIGEST_PREFIX)
        if not DIGEST_PATTERN.match(bare):
            raise ValueError(f"key {info.data.get('name', '?')!r}: digest must be 'sha256:<64 lowercase hex>' "
                             "(from `printf %s KEY | sha256sum`); a raw key never goes in config")
        return bare

    @model_validator(mode="after")
    def _limits_and_weight(self):
        for field in ("max_in_flight", "images_per_minute"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"key {self.name!r}: {field} must be at least 1 (leave it out for no limit), "
                                 f"got {value}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"key {self.name!r}: weight must be a positive finite number, got {self.weight}")
        return self


@dataclass(frozen=True)
class Tenant:
    """Whom a request is for: the name that logs, metrics and errors show, its limits and its weight."""

    name: str
    max_in_flight: int | None = None
    images_per_minute: int | None = None
    weight: float = 1.0

    @property
    def limited(self) -> bool:
        return self.max_in_flight is not None or self.images_per_minute is not None

    def tag(self) -> TenantTag:
        """What travels with its images to the Denoiser, whose queue orders tenants the same way."""
        return TenantTag(self.name, self.weight)


ANONYMOUS = Tenant(ANONYMOUS_NAME)
UNNAMED = Tenant(UNNAMED_NAME)


def tenant_of(key: TenantKey) -> Tenant:
    return Tenant(key.name, key.max_in_flight, key.images_per_minute, key.weight)


Labelled = tuple[str, Any]  # (where an entry was given, e.g. "api.keys[2]", the entry)


def labelled(where: str, entries: Sequence[Any]) -> list[Labelled]:
    return [(f"{where}[{i}]", entry) for i, entry in enumerate(entries)]


def distinct_problem(named: Sequence[tuple[str, TenantKey]], unnamed: Sequence[tuple[str, str]]) -> str | None:
    """Why these keys cannot all be served (a name or a digest given twice), naming both entries
    (never a digest); None when they can."""
    names: dict[str, str] = {}
    for where, key in named:
        if key.name in names:
            return f"{names[key.name]} and {where} both have the name {key.name!r}"
        names[key.name] = where
    digests: dict[str, str] = {}
    entries = [(key.digest, f"{where} ({key.name!r})") for where, key in named if key.digest]
    for digest, entry in entries + [(digest, where) for where, digest in unnamed]:
        if digest in digests:
            return f"{digests[digest]} and {entry} are the same key (equal digests)"
        digests[digest] = entry
    return None


@dataclass(frozen=True)
class NodeKey:
    """A raw key read on the node, hashed at once: its name (or None) and where it was given."""

    name: str | None
    digest: str
    entry: str  # "ZIMAGE_API_KEYS entry 2", "ZIMAGE_API_KEYS_FILE line 3": never the key


def parse_node_key(text: str, entry: str) -> NodeKey:
    """`key` or `name:key`. Problems name the entry, never what it holds past a valid name."""
    name, colon, key = text.partition(":")
    if not colon:
        return NodeKey(None, key_digest(text), entry)
    name, key = name.strip(), key.strip()
    if not NAME_PATTERN.match(name) or name in (ANONYMOUS_NAME, UNNAMED_NAME):
        raise ValueError(f"{entry}: the part before ':' must be a key name ({NAME_RULE}; not "
                         f"{ANONYMOUS_NAME!r} or {UNNAMED_NAME!r}); write name:key")
    if not key:
        raise ValueError(f"{entry}: {name!r} has no key after ':'")
    return NodeKey(name, key_digest(key), entry)


def node_keys(environ: Mapping[str, str] = os.environ) -> list[NodeKey]:
    """The keys of the Ingress replica's node: its environment, then its keys file."""
    found = [parse_node_key(text.strip(), f"{API_KEYS_ENV} entry {i}")
             for i, text in enumerate(environ.get(API_KEYS_ENV, "").split(","), 1) if text.strip()]
    path = environ.get(API_KEYS_FILE_ENV)
    if path:
        with open(path, encoding="utf-8") as handle:
            found += [parse_node_key(text.strip(), f"{API_KEYS_FILE_ENV} line {i}")
                      for i, text in enumerate(handle.read().splitlines(), 1) if text.strip()]
    return found


def with_node_keys(keys: Sequence[TenantKey], unnamed: Sequence[str], node: Iterable[NodeKey]
                   ) -> tuple[tuple[TenantKey, ...], tuple[str, ...]]:
    """Config's keys with the node's: a named node key fills the config entry of that name that has
    no digest (its limits), or is a new unlimited entry; an unnamed one joins the unnamed digests."""
    named, extra = labelled("api.keys", keys), labelled("api.api_key_sha256", unnamed)
    for key in node:
        if key.name is None:
            extra.append((key.entry, key.digest))
            continue
        index = next((i for i, (_, k) in enumerate(named) if k.name == key.name), None)
        if index is None:
            named.append((key.entry, TenantKey(name=key.name, digest=key.digest)))
        elif named[index][1].digest is None:
            named[index] = (named[index][0], named[index][1].model_copy(update={"digest": key.digest}))
        else:
            raise ValueError(f"{key.entry} names {key.name!r}, to which {named[index][0]} already gives a digest: "
                             "one name is one key (leave the digest out of config to take the node's key)")
    problem = distinct_problem(named, extra)
    if problem:
        raise ValueError(problem)
    return tuple(k for _, k in named), tuple(d for _, d in extra)


def merge_by_name(base: list[Any], override: list[Any]) -> list[Any]:
    """A live override's `api.keys` laid over the bound ones: an entry whose name is there changes only
    the fields it gives, a new name is added. So a limit changes without restating its digest."""
    merged = [dict(entry) if isinstance(entry, Mapping) else entry for entry in base]
    names = {entry.get("name"): i for i, entry in enumerate(merged) if isinstance(entry, Mapping)}
    for entry in override:
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if name is not None and name in names and isinstance(merged[names[name]], Mapping):
            merged[names.pop(name)].update(entry)  # popped: the same name twice in the override is kept twice
        else:
            merged.append(entry)
    return merged


class KeyTable:
    """The accepted keys of the live config and the node, by digest and by name."""

    def __init__(self, keys: Sequence[TenantKey] = (), unnamed: Sequence[str] = ()):
        self._digests = [(k.digest.encode(), tenant_of(k)) for k in keys if k.digest]
        self._digests += [(d.encode(), UNNAMED) for d in unnamed]
        self._names = {k.name: tenant_of(k) for k in keys}

    @property
    def required(self) -> bool:
        """Keys are on: some key is accepted, so a request without one is refused."""
        return bool(self._digests)

    def for_key(self, key: str) -> Tenant | None:
        """The tenant of a bearer key, or None; every digest is compared, so the time says nothing."""
        digest = key_digest(key).encode()
        found = None
        for known, tenant in self._digests:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found

    def named(self, name: str) -> Tenant | None:
        return self._names.get(name)

    def names(self) -> list[str]:
        return list(self._names)
