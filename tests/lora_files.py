"""A LoRA file placed in a Hugging Face hub cache as the hub client leaves it, for offline hub tests.

The adapter writers themselves are the package's (deployments.denoiser.lora.random_adapters).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def hub_cache(cache: Path, repo_id: str, filename: str, state: dict[str, torch.Tensor],
              commit: str = "0123456789abcdef0123456789abcdef01234567", ref: str = "main") -> Path:
    """Puts an adapter file into a Hugging Face hub cache as `hf_hub_download` leaves it (the blob under
    its hash, a snapshot symlink per commit, `refs/<ref>` naming the commit), so that the real
    resolution runs offline (`HF_HUB_OFFLINE=1`)."""
    import hashlib
    import os
    import tempfile

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "file.safetensors"
        save_file(state, str(staged))
        data = staged.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    pointer = repo / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return pointer
