"""`auto` speed settings: each hardware case resolves to the fastest path it runs, with a reason per
choice, and an explicit value always wins. Pure: no GPU needed."""

from __future__ import annotations

import pytest
import torch

from deployments.settings import ModelSettings
from deployments.speed import SPEED_FIELDS, Hardware, resolve_speed

H200 = Hardware("cuda", "NVIDIA H200", (9, 0), triton=True, cudnn_frontend=True)
H200_NO_CUDNN = Hardware("cuda", "NVIDIA H200", (9, 0), triton=True, cudnn_frontend=False)
L40S = Hardware("cuda", "NVIDIA L40S", (8, 9), triton=True)
A100 = Hardware("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), triton=True)
B200 = Hardware("cuda", "NVIDIA B200", (10, 0), triton=True, cudnn_frontend=True)
A100_NO_TRITON = Hardware("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), triton=False)
CPU = Hardware("cpu")


def values(speed) -> dict:
    return {name: choice.value for name, choice in speed.choices().items()}


def test_hopper_resolves_to_the_shipped_fused_fp8_path():
    speed = resolve_speed(H200)
    assert values(speed) == {"dtype": "bf16", "precision": "fp8", "fp8_kernels": "fused", "compile": True,
                             "dit_cuda_graphs": True, "text_encoder_compile": True, "vae_compile": True}
    assert "cuDNN" in speed.fp8_kernels.reason and speed.precision.reason.startswith("auto")
    assert speed.summary("denoiser") == "fp8 fused, compiled, CUDA graphs on NVIDIA H200 (sm90)"


def test_hopper_without_cudnns_frontend_keeps_fp8_with_bf16_attention():
    speed = resolve_speed(H200_NO_CUDNN)
    assert (speed.precision.value, speed.fp8_kernels.value) == ("fp8", "fused-bf16-attention")
    assert "nvidia-cudnn-frontend" in speed.fp8_kernels.reason


@pytest.mark.parametrize("hardware", [L40S, B200], ids=["sm89", "sm100"])
def test_other_fp8_gpus_run_fp8_through_inductor(hardware):
    speed = resolve_speed(hardware)
    assert (speed.precision.value, speed.fp8_kernels.value, speed.compile.value) == ("fp8", "inductor", True)
    assert "Hopper only" in speed.fp8_kernels.reason


def test_gpus_without_fp8_run_bf16_compiled_with_graphs():
    speed = resolve_speed(A100)
    assert values(speed) == {"dtype": "bf16", "precision": "bf16", "fp8_kernels": None, "compile": True,
                             "dit_cuda_graphs": True, "text_encoder_compile": True, "vae_compile": True}
    assert "sm80" in speed.precision.reason


def test_without_triton_nothing_compiles_but_graphs_still_replay():
    speed = resolve_speed(A100_NO_TRITON)
    assert not (speed.compile.value or speed.text_encoder_compile.value or speed.vae_compile.value)
    assert speed.dit_cuda_graphs.value and "Triton" in speed.compile.reason


def test_fp8_through_inductor_needs_compile():
    speed = resolve_speed(L40S, compile=False)
    assert speed.precision.value == "bf16" and "compile" in speed.precision.reason
    assert resolve_speed(H200, compile=False).precision.value == "fp8"  # the fused kernels run eagerly


def test_the_cpu_runs_float32_plain_whatever_is_asked():
    auto = resolve_speed(CPU)
    assert values(auto) == {"dtype": "float32", "precision": "float32", "fp8_kernels": None, "compile": False,
                            "dit_cuda_graphs": False, "text_encoder_compile": False, "vae_compile": False}
    asked = resolve_speed(CPU, precision="fp8", compile=True, dit_cuda_graphs=True, vae_compile=True)
    assert values(asked) == values(auto)
    assert "CUDA only" in asked.precision.reason and "CUDA only" in asked.compile.reason
    assert auto.summary("denoiser") == "float32, eager on cpu"


@pytest.mark.parametrize("hardware", [H200, L40S, A100], ids=["sm90", "sm89", "sm80"])
def test_an_explicit_value_wins_over_auto(hardware):
    speed = resolve_speed(hardware, precision="bf16", compile=False, dit_cuda_graphs=False,
                          text_encoder_compile=False, vae_compile=False)
    assert values(speed) == {"dtype": "bf16", "precision": "bf16", "fp8_kernels": None, "compile": False,
                             "dit_cuda_graphs": False, "text_encoder_compile": False, "vae_compile": False}
    assert all(c.reason == "set explicitly" for k, c in speed.choices().items() if k not in ("dtype", "fp8_kernels"))
    for choice in ("inductor", "fused", "fused-bf16-attention"):
        kernels = resolve_speed(hardware, precision="fp8", fp8_kernels=choice)
        assert (kernels.precision.value, kernels.fp8_kernels.value) == ("fp8", choice)


def test_model_settings_default_to_auto_and_take_the_command_lines_strings():
    defaults = ModelSettings()
    assert all(getattr(defaults, name) == "auto" for name in SPEED_FIELDS)
    set_ = ModelSettings(compile="false", vae_compile="true", precision="bf16", dit_cuda_graphs="auto")
    assert (set_.compile, set_.vae_compile, set_.precision, set_.dit_cuda_graphs) == (False, True, "bf16", "auto")
    with pytest.raises(ValueError):
        ModelSettings(compile="sometimes")
    with pytest.raises(ValueError):
        ModelSettings(fp8_kernels="fast")
    speed = ModelSettings(device="cpu").resolve_speed(torch.device("cpu"))
    assert speed.precision.value == "float32" and speed.as_dict(("precision",)) == {
        "device": "cpu", "precision": {"value": "float32", "reason": "the CPU runs float32"}}
