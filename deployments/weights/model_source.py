"""Where the weights come from: one `model` setting understood by every stage.

`model` is one of
- a hub id (default `Tongyi-MAI/Z-Image-Turbo`) or a local directory in diffusers layout;
- `tiny`: a small random checkpoint built deterministically into the cache on first use, then loaded
  through the same code path as a real checkpoint;
- `random`: the full-size architecture with random weights, built on the target device.

Each stage asks only for its own components; a missing or wrong component fails at start-up with a
message that names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
TINY = "tiny"
RANDOM = "random"

Component = Literal["transformer", "text_encoder", "tokenizer", "vae", "scheduler"]

# The classes each component may be, as named in model_index.json.
EXPECTED_CLASSES: dict[str, tuple[str, ...]] = {
    "transformer": ("ZImageTransformer2DModel",),
    "text_encoder": ("Qwen3Model", "Qwen3ForCausalLM"),
    "tokenizer": ("Qwen2Tokenizer", "Qwen2TokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend"),
    "vae": ("AutoencoderKL",),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}

# The file inside each component folder that says what it is.
CONFIG_FILES: dict[str, str] = {
    "transformer": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}

WEIGHTED = ("transformer", "text_encoder", "vae")


class ModelSourceError(ValueError):
    """The `model` setting cannot be used: the message says what is missing or wrong."""


def default_cache_dir() -> Path:
    """Operator concern: where built checkpoints and compile caches live."""
    env = os.environ.get("ZIMAGE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "zimage-serve"


@dataclass(frozen=True)
class WeightsSource:
    """Where one set of weights comes from (the model's or the ControlNet's): `kind` says how it is
    read, `location` is a hub id, a directory or a file; `random` has none."""

    kind: str
    name: str
    location: str | None

    @property
    def random_weights(self) -> bool:
        """True when the weights carry no meaning (tiny and random): responses and logs say so."""
        return self.kind == "random" or self.name == TINY


@dataclass(frozen=True)
class ModelSource(WeightsSource):
    """A resolved `model` setting. `location` is a hub id or a directory; `random` has none."""

    kind: Literal["hub", "directory", "random"]

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def resolve_model_source(model: str, cache_dir: str | Path | None = None) -> ModelSource:
    """Turns the `model` setting into a source; builds the tiny checkpoint on first use."""
    if not isinstance(model, str) or not model.strip():
        raise ModelSourceError("model must be a hub id, a local directory, 'tiny' or 'random'")
    model = model.strip()
    if model == RANDOM:
        return ModelSource(kind="random", name=RANDOM, location=None)
    if model == TINY:
        from deployments.weights.tiny_checkpoint import ensure_tiny_checkpoint

        path = ensure_tiny_checkpoint(Path(cache_dir) if cache_dir else default_cache_dir())
        return ModelSource(kind="directory", name=TINY, location=str(path))
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelSourceError(f"model directory {path} does not exist")
        check_model_index(path)
        return ModelSource(kind="directory", name=str(path), location=str(path.resolve()))
    if model.count("/") == 1 and all(part for part in model.split("/")):
        return ModelSource(kind="hub", name=model, location=model)
    raise ModelSourceError(
        f"unknown model {model!r}: expected a hub id like {DEFAULT_MODEL!r}, an existing directory "
        f"in diffusers layout, {TINY!r} or {RANDOM!r}"
    )


def check_model_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelSourceError(f"{path} is not a diffusers checkpoint: model_index.json is missing")
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{index_file} is not valid JSON: {exc}") from exc


def _read_model_index(source: ModelSource) -> dict:
    if source.kind == "directory":
        return check_model_index(Path(source.location))
    from huggingface_hub import hf_hub_download

    try:
        index_file = hf_hub_download(source.location, "model_index.json")
    except Exception as exc:  # network, auth, missing repo: say which
        raise ModelSourceError(
            f"could not fetch model_index.json of {source.location!r} from the hub ({type(exc).__name__}: "
            f"{exc}); pass a local directory in diffusers layout instead"
        ) from exc
    return json.loads(Path(index_file).read_text())


def check_component(source: ModelSource, component: Component) -> None:
    """Fails with a clear message when a component is absent, incomplete or of the wrong class."""
    index = _read_model_index(source)
    entry = index.get(component)
    if not entry or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        raise ModelSourceError(f"{source.name}: model_index.json names no {component!r} component")
    class_name = entry[1]
    if class_name not in EXPECTED_CLASSES[component]:
        raise ModelSourceError(
            f"{source.name}: component {component!r} is a {class_name}, expected one of "
            f"{', '.join(EXPECTED_CLASSES[component])}"
        )
    if source.kind != "directory":
        return
    folder = Path(source.location) / component
    if not folder.is_dir():
        raise ModelSourceError(f"{source.name}: the {component}/ folder is missing")
    config = folder / CONFIG_FILES[component]
    if not config.is_file():
        raise ModelSourceError(f"{source.name}: {component}/{CONFIG_FILES[component]} is missing")
    if component in WEIGHTED and not any(
        p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json") for p in folder.iterdir()
    ):
        raise ModelSourceError(f"{source.name}: {component}/ has no weight files (*.safetensors)")
    if component == "tokenizer" and not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise ModelSourceError(f"{source.name}: tokenizer/ has neither tokenizer.json nor vocab.json")


def ensure_instance(obj: object, component: Component, allowed: tuple[type, ...], source: ModelSource) -> None:
    if not isinstance(obj, allowed):
        raise ModelSourceError(
            f"{source.name}: loaded {component} is a {type(obj).__name__}, expected "
            f"{' or '.join(t.__name__ for t in allowed)}"
        )
