"""A request's LoRA problems: each is the request's own fault (a 400 naming `loras`), never the replica's."""

from __future__ import annotations


class LoraRequestError(ValueError):
    """Base: the Ingress maps it to 400 with `param: "loras"` (serve_app.errors)."""


class UnknownLoraError(LoraRequestError):
    def __init__(self, name: str):
        super().__init__(f"unknown LoRA adapter {name!r}; GET /v1/loras lists the adapters this server offers")
        self.name = name

    def __reduce__(self):  # crosses Ray's process boundary with its own arguments
        return type(self), (self.name,)


class LoraFormatError(LoraRequestError):
    """The file is not a LoRA adapter this server can apply (its message says why)."""


class LoraFitError(LoraRequestError):
    """The adapter's keys or shapes do not fit the model; `key` is the first one that does not."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.detail = key, message

    def __reduce__(self):  # crosses Ray's process boundary with its own arguments
        return type(self), (self.key, self.detail)


class LoraUnsupportedError(LoraRequestError):
    """The replica's DiT was built without adapter support (`DenoiseLoop(lora=False)`)."""


class LoraHubMissingError(LoraRequestError):
    """The hub says the alias's file does not exist (or is not ours to read): a 400 naming the alias."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"LoRA adapter {name!r} cannot be fetched: its hub file does not exist or is not "
                         f"accessible ({reason})")
        self.name, self.reason = name, reason

    def __reduce__(self):
        return type(self), (self.name, self.reason)


class LoraHubUnavailableError(RuntimeError):
    """The alias's hub file is not cached here and the hub cannot be reached: the server's state, a 503."""

    def __init__(self, name: str):
        super().__init__(f"LoRA adapter {name!r} is not cached on this server and the hub cannot be reached")
        self.name = name

    def __reduce__(self):
        return type(self), (self.name,)
