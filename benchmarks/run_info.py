"""What every benchmark JSON records about the code it ran."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit_of(root: Path) -> str:
    """The commit of another checkout (`ZIMAGE_COMMIT` for a copy without git metadata)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or os.environ.get("ZIMAGE_COMMIT", "unknown")
    except Exception:  # noqa: BLE001
        return os.environ.get("ZIMAGE_COMMIT", "unknown")


def commit() -> str:
    """`ZIMAGE_COMMIT` when set (a copy of the tree whose git metadata is not current), else git's HEAD."""
    if os.environ.get("ZIMAGE_COMMIT"):
        return os.environ["ZIMAGE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"
