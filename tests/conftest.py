"""Shared fixtures: one tiny checkpoint per test session, loaded through the real loading code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels defined from here on run in Triton's interpreter on CPU tensors
    # (tests/unit/test_fused_fp8.py); the choice is made when a kernel is defined, so before imports.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deployments.local_pipeline import LocalPipeline
from deployments.weights.controlnet_source import resolve_controlnet
from deployments.weights.model_source import resolve_model_source
from tests.diffusers_reference import controlnet_reference, quiet

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the session, shared with Ray workers through the environment."""
    path = Path(os.environ.get("ZIMAGE_TEST_CACHE_DIR") or tmp_path_factory.mktemp("zimage-cache"))
    os.environ["ZIMAGE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_source(cache_dir):
    return resolve_model_source("tiny", cache_dir)


@pytest.fixture(scope="session")
def pipeline(tiny_source) -> LocalPipeline:
    return LocalPipeline(tiny_source, CPU, F32)


@pytest.fixture(scope="session")
def diffusers_t2i(tiny_source):
    from diffusers import ZImagePipeline

    return quiet(ZImagePipeline.from_pretrained(tiny_source.location, torch_dtype=F32))


@pytest.fixture(scope="session")
def diffusers_i2i(diffusers_t2i):
    from diffusers import ZImageImg2ImgPipeline

    return quiet(ZImageImg2ImgPipeline(**diffusers_t2i.components))


@pytest.fixture(scope="session")
def tiny_controlnet(cache_dir):
    return resolve_controlnet("tiny", cache_dir)


@pytest.fixture(scope="session")
def diffusers_control(diffusers_t2i, tiny_controlnet):
    return controlnet_reference(diffusers_t2i, tiny_controlnet.location)


@pytest.fixture(scope="session")
def diffusers_control_inpaint(diffusers_control):
    from diffusers import ZImageControlNetInpaintPipeline

    return quiet(ZImageControlNetInpaintPipeline(**diffusers_control.components))
