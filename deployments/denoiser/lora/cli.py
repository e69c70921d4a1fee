"""`zimage-lora`: adapter files for the server's adapter folder, from the command line.

    zimage-lora random NAME --rank 8          # NAME.safetensors for the default model (tiny)
    zimage-lora random NAME --model random    # shaped for the full-size DiT

The folder is the server's own `lora_dir` with the same defaults (`loras/` under `--cache-dir`, else
under ZIMAGE_CACHE_DIR or ~/.cache/zimage-serve), so a running server offers the adapter at once.
The shapes come from `--model` (the server's `model` setting; it must match the served model).
"""

from __future__ import annotations

import argparse
import sys

import torch

from deployments.denoiser.lora import random_adapters
from deployments.denoiser.lora.library import NAME_PATTERN


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="zimage-lora", description="LoRA adapter files for zimage-serve.")
    commands = root.add_subparsers(dest="command", required=True)
    random = commands.add_parser(
        "random", help="write a random test adapter into the server's adapter folder",
        description="Writes NAME.safetensors: random rank-r factors on every attention and feed-forward "
                    "linear of the model's DiT. It changes images without meaning; it exercises the adapter path.")
    random.add_argument("name", help="the adapter's name in requests: letters, digits, _ and -, up to 64")
    random.add_argument("--rank", type=int, default=8, help="rank of the factors (default 8)")
    random.add_argument("--model", default="tiny", help="the served model: 'tiny' (default), 'random', a hub id "
                                                        "or a local directory")
    random.add_argument("--lora-dir", default=None, help="the server's lora_dir (default: loras/ under the cache)")
    random.add_argument("--cache-dir", default=None, help="the server's cache_dir (default: ZIMAGE_CACHE_DIR)")
    random.add_argument("--strength", type=float, default=0.5, help="size of the update (default 0.5)")
    random.add_argument("--seed", type=int, default=0)
    random.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    random.add_argument("--force", action="store_true", help="replace a file of that name")
    return root


def write_random(args: argparse.Namespace) -> str:
    """Writes the adapter; the line to print. A problem raises SystemExit with its message."""
    from deployments.settings import ModelSettings

    if not NAME_PATTERN.fullmatch(args.name):
        raise SystemExit(f"zimage-lora: {args.name!r} is not an adapter name: use letters, digits, _ and -, "
                         "up to 64 characters")
    if not 1 <= args.rank <= 1024:
        raise SystemExit("zimage-lora: --rank must be within 1..1024")
    settings = ModelSettings(model=args.model, cache_dir=args.cache_dir, lora_dir=args.lora_dir)
    directory = settings.lora_settings().directory()
    path = directory / f"{args.name}.safetensors"
    if path.exists() and not args.force:
        raise SystemExit(f"zimage-lora: {path} exists; pass --force to replace it")
    transformer = random_adapters.transformer_on_meta(settings.source())
    factors = random_adapters.random_factors(transformer, rank=args.rank, seed=args.seed, strength=args.strength)
    state = (random_adapters.diffusers_state(factors) if args.format == "diffusers"
             else random_adapters.kohya_state(factors, alpha=float(args.rank)))
    state = {key: value.to(torch.bfloat16) for key, value in state.items()}
    random_adapters.write(directory, args.name, state)
    size = path.stat().st_size
    return (f"wrote {path} (rank {args.rank}, {len(factors)} linears, {size / 1e6:.1f} MB, for model "
            f"{args.model!r}); request it as \"loras\": [{{\"name\": \"{args.name}\", \"scale\": 1.0}}]")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    print(write_random(args))


if __name__ == "__main__":
    main(sys.argv[1:])
