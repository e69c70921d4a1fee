"""Warm-up: every graph and attention plan a request will need, made before a replica is ready."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from deployments.core.compile_cache import save_compile_artifacts
from deployments.core.dit.blocks import model_device_dtype


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@torch.inference_mode()
def warmup(
    transformer: nn.Module,
    sizes: Iterable[int | tuple[int, int]],
    caption_len: int = 160,
    *,
    batch_sizes: Sequence[int] = (1,),
    ragged: bool = True,
    caption_buckets: Sequence[int] = (),
    save_artifacts: bool = True,
) -> dict[str, float]:
    """Runs one forward per size (width, height in pixels, or one int for a square) on random inputs.

    Compiles every graph a request will need, so no request pays for compilation: for each batch
    size over 1 it also runs equal caption lengths (no mask) and, with `ragged`, unequal ones (the
    masked graph). Runs under `inference_mode`, as the denoise loop does (a different grad mode
    would be a different graph). `caption_buckets` (padded caption lengths) are run once each at
    batch 1: the graphs are shared, but cuDNN plans its attention per shape (tens of ms each,
    twice per forward: the caption refiner and the main layers), which a single request with a new
    caption length would otherwise pay; they run one token short of the bucket, so the graph of a
    caption the model pads (a first request compiled one, measured) is compiled here too. Returns
    seconds per call, keyed `WxH/bN[/ragged|/capL]`. When `compile_blocks` was given a cache directory, also writes the mega-cache file there
    (`save_artifacts`), so a fresh node can start from that one file.
    """
    from deployments.core.denoising import latent_shape

    device, dtype = model_device_dtype(transformer)
    channels = transformer.config.in_channels
    cap_dim = transformer.config.cap_feat_dim
    generator = torch.Generator("cpu").manual_seed(0)
    timings: dict[str, float] = {}

    def run(key: str, width: int, height: int, cap_lens: list[int]) -> None:
        shape = latent_shape(channels, width, height)
        latents = [
            torch.randn(shape, generator=generator).to(device, dtype).unsqueeze(2)[0] for _ in cap_lens
        ]
        captions = [torch.randn(n, cap_dim, generator=generator).to(device, dtype) for n in cap_lens]
        t = torch.full((len(cap_lens),), 0.5, device=device)
        _sync(device)
        start = time.perf_counter()
        transformer(latents, t, captions, return_dict=False)
        _sync(device)
        timings[key] = time.perf_counter() - start

    for size in sizes:
        width, height = _as_size(size)
        for batch in batch_sizes:
            run(f"{width}x{height}/b{batch}", width, height, [caption_len] * batch)
            if batch == 1:
                for length in caption_buckets:  # one token short: the model pads it, as most captions
                    run(f"{width}x{height}/b1/cap{length}", width, height, [max(1, length - 1)])
            if batch > 1 and ragged:
                lens = [max(1, caption_len - 33 * (i % 2)) for i in range(batch)]
                run(f"{width}x{height}/b{batch}/ragged", width, height, lens)
    cache_dir, artifacts_name = getattr(transformer, "_compile_artifacts", (None, "dit"))
    if save_artifacts and cache_dir is not None:
        save_compile_artifacts(cache_dir, artifacts_name)
    return timings


def warm_for_serving(
    transformer: nn.Module, sizes: Iterable[int | tuple[int, int]], max_batch_size: int, max_caption_tokens: int
) -> dict[str, float]:
    """The warm-up a serving replica runs before it reports ready (`warmup` with these choices).

    Batch sizes 1, 2 and the largest: two sizes over 1 make sure the graph for batches over 1 is the
    dynamic one (a first compile may specialize on the batch size it saw, and the next batch size
    would then stall a live request for a recompile). Every caption bucket the DiT pads to, up to
    `max_caption_tokens`, at batch 1 (cuDNN's attention plans; padded captions' graph).
    """
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

    batch_sizes = sorted({1, min(2, max_batch_size), max_batch_size})
    buckets = range(SEQ_MULTI_OF, max_caption_tokens + 1, SEQ_MULTI_OF)
    return warmup(transformer, sizes, batch_sizes=batch_sizes, caption_buckets=buckets)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
