"""The `tiny` checkpoint: Z-Image's architecture at toy size, for the quick start and the tests.

It is built deterministically (fixed seeds, a fixed corpus) on first use, written with
`save_pretrained` in diffusers layout, and loaded afterwards through the same code path as a real
checkpoint; diffusers' own `ZImagePipeline.from_pretrained` loads it too. Its tokenizer is a real
byte-level BPE trained offline on a small built-in corpus, with a Qwen3-style chat template, so
`apply_chat_template(..., enable_thinking=True)` behaves as the real one does.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from deployments.weights.random_model import FULL_SCHEDULER_CONFIG, FULL_TRANSFORMER_CONFIG, FULL_VAE_CONFIG

TINY_VERSION = "tiny-v1"
COMPLETE_MARKER = ".complete"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat layout: each turn between <|im_start|>role and <|im_end|>; with thinking disabled the
# assistant turn opens with an empty think block, with thinking enabled (Z-Image's choice) it does not.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# The full-size configs (`random_model`) at toy size: only widths, depths and RoPE sizes differ.
TINY_TRANSFORMER_CONFIG = {
    **FULL_TRANSFORMER_CONFIG,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 64,
    "axes_dims": [8, 12, 12],
    "axes_lens": [1024, 128, 128],
}

TINY_VAE_CONFIG = {**FULL_VAE_CONFIG, "block_out_channels": (8, 16, 16, 32), "layers_per_block": 1,
                   "norm_num_groups": 8}

TINY_SCHEDULER_CONFIG = dict(FULL_SCHEDULER_CONFIG)


def tiny_text_encoder_config(vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    }


def _corpus() -> list[str]:
    """Training text for the tiny BPE: image-prompt vocabulary, written for this project."""
    subjects = (
        "a red fox in fresh snow", "an old lighthouse on a rocky coast at dusk", "a bowl of ramen with steam",
        "a cyberpunk street market in the rain", "a portrait of an elderly fisherman", "a glass teapot on a table",
        "a mountain lake reflecting pine trees", "a robot reading a book in a library", "a koi pond in autumn",
        "a vintage car parked under neon signs", "a field of sunflowers under a storm", "a cat asleep on a windowsill",
        "a castle floating above the clouds", "a watercolor map of an imaginary city", "a close-up of a dew drop",
        "a busy train station at rush hour", "a desert canyon at golden hour", "a child flying a kite on a beach",
    )
    qualities = (
        "highly detailed", "soft natural light", "dramatic shadows", "wide angle", "shallow depth of field",
        "vibrant colors", "muted pastel palette", "sharp focus", "film grain", "studio lighting", "8k resolution",
        "cinematic composition", "oil on canvas", "digital illustration", "anime style", "photorealistic",
    )
    lines = []
    for i, subject in enumerate(subjects):
        q1, q2 = qualities[i % len(qualities)], qualities[(3 * i + 5) % len(qualities)]
        lines.append(f"{subject}, {q1}, {q2}.")
        lines.append(f"{subject.capitalize()} with {q2} and {q1}")
    lines += ["The quick brown fox jumps over the lazy dog. 0123456789", "Render, painting, photo, sketch, poster!"]
    return lines


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer()  # only for Qwen2's normalizer and pre-tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_pipeline():
    """The tiny components as an in-memory diffusers pipeline (float32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_tokenizer()
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)
    torch.manual_seed(20251121)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    torch.manual_seed(20251122)
    text_encoder = Qwen3Model(Qwen3Config(**tiny_text_encoder_config(vocab_size)))
    torch.manual_seed(20251123)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER_CONFIG)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def ensure_tiny_checkpoint(cache_dir: Path) -> Path:
    """Returns the tiny checkpoint's directory, building it once (safe with concurrent replicas)."""
    return build_once(cache_dir, TINY_VERSION, build_tiny_pipeline)


def build_once(cache_dir: Path, version: str, build) -> Path:
    """`cache_dir/version`, saved from `build()` (a diffusers model or pipeline) once: under a file lock,
    so concurrent replicas of one node build it once, and into a staging folder renamed into place, so a
    reader never sees a half-written one."""
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / version
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=cache_dir))
        try:
            build().save_pretrained(staging, safe_serialization=True)
            (staging / COMPLETE_MARKER).write_text("built by zimage-serve\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
