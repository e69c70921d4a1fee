"""The Denoiser's scheduling policies by name (`deployments.denoiser.scheduling` runs them): the
app's config and the Denoiser's live config validate them without importing the scheduler or torch."""

from __future__ import annotations

from typing import Literal

SchedulingPolicy = Literal["single", "batch", "continuous"]
POLICIES: tuple[str, ...] = ("single", "batch", "continuous")
