"""Loads one stage's components from a resolved model source.

Each function loads only what its stage needs, so a Denoiser replica never touches the text
encoder's weights and vice versa. `random` builds the full-size architecture on the target device
with random weights (no download is possible there); everything else goes through `from_pretrained`
with `device_map` set to the stage's device, so the safetensors files are read straight onto it
(no full copy in host memory first, then a second copy to the GPU: a replica's start waits on both).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from deployments.weights.model_source import (
    ModelSource,
    ModelSourceError,
    check_component,
    ensure_instance,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is a start-up error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError("device 'cuda' was asked for but no CUDA device is visible")
    return dev


_random_init_s = 0.0


def random_init_seconds() -> float:
    """Seconds this process has spent building random-weight models (a start phase of their own:
    real weights do not pay it)."""
    return _random_init_s


@contextlib.contextmanager
def _building_on(device: torch.device, dtype: torch.dtype):
    """Builds a random-weight model on `device` in `dtype`; its seconds go to `random_init_seconds`."""
    global _random_init_s
    previous, start = torch.get_default_dtype(), time.perf_counter()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the initialisers' kernels, not only their launches
        _random_init_s += time.perf_counter() - start


def _warn_random(component: str, source: ModelSource) -> None:
    if source.random_weights:
        logger.warning("%s of model %r has RANDOM weights: images carry no meaning", component, source.name)


def _load_model(cls, component: str, random_config: dict, source: ModelSource, device: torch.device,
                dtype: torch.dtype):
    """A diffusers model component (`transformer`, `vae`): built from `random_config` with seeded random
    weights for `model=random`, else read from its subfolder of the source."""
    _warn_random(component, source)
    if source.is_random:
        torch.manual_seed(0)
        with _building_on(device, dtype):
            model = cls(**random_config)
        return model.eval().requires_grad_(False)
    check_component(source, component)
    model = cls.from_pretrained(source.location, subfolder=component, torch_dtype=dtype, device_map=str(device))
    ensure_instance(model, component, (cls,), source)
    return model.to(device).eval().requires_grad_(False)  # a no-op where the map put everything there


def load_transformer(source: ModelSource, device: torch.device, dtype: torch.dtype):
    from diffusers import ZImageTransformer2DModel

    from deployments.weights.random_model import FULL_TRANSFORMER_CONFIG

    return _load_model(ZImageTransformer2DModel, "transformer", FULL_TRANSFORMER_CONFIG, source, device, dtype)


def load_scheduler(source: ModelSource):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if source.is_random:
        from deployments.weights.random_model import FULL_SCHEDULER_CONFIG

        return FlowMatchEulerDiscreteScheduler(**FULL_SCHEDULER_CONFIG)
    check_component(source, "scheduler")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source.location, subfolder="scheduler")
    ensure_instance(scheduler, "scheduler", (FlowMatchEulerDiscreteScheduler,), source)
    return scheduler


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if source.is_random:
        # No full-size tokenizer can be downloaded here; the tiny checkpoint's real BPE stands in,
        # its ids all fall inside the full-size vocabulary.
        from deployments.weights.model_source import default_cache_dir
        from deployments.weights.tiny_checkpoint import ensure_tiny_checkpoint

        global _random_init_s
        start = time.perf_counter()  # on a cold cache the tiny checkpoint is built first: random's own cost
        location, subfolder = str(ensure_tiny_checkpoint(default_cache_dir())), "tokenizer"
        _random_init_s += time.perf_counter() - start
    else:
        check_component(source, "tokenizer")
        location, subfolder = source.location, "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(location, subfolder=subfolder)
    ensure_instance(tokenizer, "tokenizer", (PreTrainedTokenizerBase,), source)
    if tokenizer.chat_template is None:
        raise ModelSourceError(f"{source.name}: the tokenizer has no chat template")
    return tokenizer


def load_text_encoder(source: ModelSource, device: torch.device, dtype: torch.dtype, penultimate_only: bool = True):
    """Qwen3 encoder cut after the layer whose output Z-Image uses (`hidden_states[-2]`).

    The last decoder layer and the final norm only feed `hidden_states[-1]`, which Z-Image never
    reads: dropping them saves a layer of compute and memory and gives the wanted states directly.
    `penultimate_only=False` keeps the whole model, as diffusers' own pipeline runs it.
    """
    from transformers import Qwen3Config, Qwen3Model

    _warn_random("text_encoder", source)
    if source.is_random:
        from deployments.weights.random_model import FULL_TEXT_ENCODER_CONFIG

        torch.manual_seed(0)
        with _building_on(device, dtype):
            model = Qwen3Model(Qwen3Config(**FULL_TEXT_ENCODER_CONFIG))
    else:
        check_component(source, "text_encoder")
        model = Qwen3Model.from_pretrained(source.location, subfolder="text_encoder", dtype=dtype,
                                           device_map=str(device))
        ensure_instance(model, "text_encoder", (Qwen3Model,), source)
        model = model.to(device)  # a no-op where the map put everything there
    if penultimate_only:
        model = truncate_to_penultimate(model)
    return model.eval().requires_grad_(False)


def truncate_to_penultimate(model):
    model.layers = model.layers[:-1]
    model.norm = torch.nn.Identity()
    model.config.num_hidden_layers = len(model.layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[: len(model.layers)]
    return model


def load_vae(source: ModelSource, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    from deployments.weights.random_model import FULL_VAE_CONFIG

    return _load_model(AutoencoderKL, "vae", FULL_VAE_CONFIG, source, device, dtype)

