"""The LoRA consumer kernels (deployments.denoiser.lora.consumers: q/k/v, SwiGLU, gated residual) compiled for an H100/H200 (sm_90a)
on a machine without a GPU: Triton's compiler and the ptxas it ships with, at the tiles and warps
the ops launch. The interpreter (test_lora_consumers) checks what the kernels compute; only the
compiler sees what fails on a GPU alone (types, layouts, a loop bound read from memory) and what
makes a kernel slow before it runs (registers spilled to local memory).

It runs in a process of its own: this session's kernels were defined for the interpreter
(tests/conftest.py sets TRITON_INTERPRET before they are).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LORA = {"h_ptr": "*bf16", "h_row_stride": "i32", "b_ptr": "*bf16", "b_sg": "i32", "b_sp": "i32", "b_sc": "i32",
        "b_sr": "i32", "groups_ptr": "*i64", "rows_per_item": "i32", "a_rank": "i32", "rank": "i32",
        "used_ptr": "*i32"}
QKV = {"qkv_ptr": "*bf16", **LORA, "wq_ptr": "*bf16", "wk_ptr": "*bf16", "rope_ptr": "*fp32",
       "qk_descale_ptr": "*fp32", "v_amax_ptr": "*fp32", "v_descale_ptr": "*fp32", "q_ptr": "*fp8e4nv",
       "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "rows": "i32", "heads": "i32", "row_stride": "i32", "eps_q": "fp32",
       "eps_k": "fp32", "AMAX_ONLY": "constexpr", "BM": "constexpr", "HALF": "constexpr",
       "USED_IN_MEMORY": "constexpr", "DOT_F32": "constexpr"}
RESIDUAL = {"x_ptr": "*bf16", "y_ptr": "*bf16", **LORA, "w_ptr": "*bf16", "gate_ptr": "*bf16", "out_ptr": "*bf16",
            "next_w_ptr": "*bf16", "next_mod_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "rows": "i32",
            "n_cols": "i32", "y_row_stride": "i32", "mod_rows_per_item": "i32", "eps": "fp32", "next_eps": "fp32",
            "HAS_GATE": "constexpr", "NEXT": "constexpr", "NEXT_HAS_MOD": "constexpr", "BM": "constexpr",
            "BN": "constexpr", "USED_IN_MEMORY": "constexpr", "DOT_F32": "constexpr"}
SWIGLU = {"y_ptr": "*bf16", **LORA, "amax_ptr": "*fp32", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "rows": "i32",
          "n_cols": "i32", "row_stride": "i32", "QUANT": "constexpr", "BM": "constexpr", "BN": "constexpr",
          "USED_IN_MEMORY": "constexpr", "DOT_F32": "constexpr"}


def compile_all() -> dict[str, str]:
    """Each variant the ops launch, compiled for sm_90a: ptxas's register and spill lines, by variant."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deployments.denoiser.lora import consumers as c
    from deployments.denoiser.lora import residual_consumer as r

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    target = GPUTarget("cuda", 90, 32)
    variants = {}
    for used in (True, False):
        for amax_only in (True, False):
            variants[f"qkv amax_only={amax_only} used_in_memory={used}"] = (
                c._qkv_lora_kernel, QKV, c.QKV_WARPS,
                {"AMAX_ONLY": amax_only, "BM": c.QKV_ROWS, "HALF": 64, "USED_IN_MEMORY": used, "DOT_F32": False})
        for quant in (False, True):
            variants[f"swiglu quant={quant} used_in_memory={used}"] = (
                c._swiglu_lora_kernel, SWIGLU, c.SWIGLU_WARPS,
                {"QUANT": quant, "BM": c.SWIGLU_ROWS, "BN": c.SWIGLU_COLUMNS, "USED_IN_MEMORY": used,
                 "DOT_F32": False})
        for fused_next in (True, False):
            variants[f"gated_residual next={fused_next} used_in_memory={used}"] = (
                r._gated_residual_lora_kernel, RESIDUAL, r.RESIDUAL_WARPS,
                {"HAS_GATE": True, "NEXT": fused_next, "NEXT_HAS_MOD": fused_next, "BM": r.RESIDUAL_ROWS,
                 "BN": r.RESIDUAL_COLUMNS, "USED_IN_MEMORY": used, "DOT_F32": False})
    found = {}
    for name, (kernel, signature, warps, constants) in variants.items():
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target,
                                  options={"num_warps": warps})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                                    capture_output=True, text=True, check=True).stderr
        found[name] = " ".join(line.strip() for line in report.splitlines() if "spill" in line or "registers" in line)
    return found


def test_the_lora_kernels_compile_for_sm90_without_spilling():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(found, indent=1))
    assert len(found) == 12
    for name, report in found.items():
        assert "0 bytes spill stores" in report and "0 bytes spill loads" in report, (name, report)


if __name__ == "__main__":
    print(json.dumps(compile_all()))
