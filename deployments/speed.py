"""The speed settings, `auto` resolved on the replica's own device: the fastest path it runs.

Resolved inside each replica, never on the node that builds the application (a CPU head node may
hold no GPU, and a cluster may mix GPU kinds). `resolve_speed` is a pure function from what the
device is (`Hardware`) and what the operator asked for to one `Speed`, a value and a reason per
choice; an explicit value always wins over `auto`.

- Hopper (sm90): FP8 DiT with the fused kernels (our Triton kernels and cuDNN's FP8 attention, with
  `nvidia-cudnn-frontend` installed: `pip install ".[gpu]"`), regional compile, DiT CUDA graphs,
  compiled text-encoder layers and VAE decoder: the path serve_config.yaml shipped, measured in
  benchmarks/RESULTS.md.
- Other CUDA GPUs: bf16 with compile and graphs; FP8 through torchao's linears and inductor where
  the GPU has FP8 tensor cores (sm89 and up) and compile is on; the fused kernels were tuned and
  measured on Hopper only, so they stay an explicit choice elsewhere.
- CPU: float32, eager. FP8, compile and CUDA graphs apply on CUDA only.

FP8 and bf16 give different pixels for one seed (each within its own rounding of the same model),
so a cluster that mixes GPU kinds gives different pixels for one seed on different replicas; pin
`precision` (and `fp8_kernels`) to make them agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Auto = Literal["auto"]
FP8_MIN_CAPABILITY = (8, 9)
HOPPER = 9
SPEED_FIELDS = ("precision", "fp8_kernels", "compile", "dit_cuda_graphs", "text_encoder_compile", "vae_compile")

StagePart = Literal["text_encoder", "denoiser", "vae"]
STAGE_CHOICES: dict[str, tuple[str, ...]] = {
    "text_encoder": ("dtype", "text_encoder_compile"),
    "denoiser": ("dtype", "precision", "fp8_kernels", "compile", "dit_cuda_graphs"),
    "vae": ("dtype", "vae_compile"),
}
"""The choices each model stage applies (what its `stats()` reports)."""


@dataclass(frozen=True)
class Hardware:
    """What a replica's device can run: the facts `resolve_speed` decides from."""

    kind: Literal["cuda", "cpu"]
    name: str = "cpu"
    capability: tuple[int, int] | None = None
    triton: bool = False  # inductor's GPU backend and our fused kernels
    cudnn_frontend: bool = False  # cuDNN's FP8 attention (`nvidia-cudnn-frontend`)

    @classmethod
    def probe(cls, device) -> "Hardware":
        """The replica's own device (a `torch.device`), as torch sees it in this process."""
        import importlib.util

        import torch

        if device.type != "cuda" or not torch.cuda.is_available():
            return cls("cpu")
        return cls("cuda", torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)),
                   triton=importlib.util.find_spec("triton") is not None,
                   cudnn_frontend=importlib.util.find_spec("cudnn") is not None)

    def label(self) -> str:
        return self.name if self.capability is None else f"{self.name} (sm{self.capability[0]}{self.capability[1]})"


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str


@dataclass(frozen=True)
class Speed:
    """Resolved speed settings, each with why. `dtype` is what the stages' weights and activations
    run in; `precision` is the DiT's linears (FP8 on top of bf16, or the dtype itself)."""

    hardware: Hardware
    dtype: Choice
    precision: Choice
    fp8_kernels: Choice
    compile: Choice
    dit_cuda_graphs: Choice
    text_encoder_compile: Choice
    vae_compile: Choice

    def choices(self, keys: tuple[str, ...] | None = None) -> dict[str, Choice]:
        names = [f.name for f in fields(self) if f.name != "hardware"]
        return {name: getattr(self, name) for name in names if keys is None or name in keys}

    def as_dict(self, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """For a stage's `stats()`: the device and each choice's value and reason."""
        return {"device": self.hardware.label(), **{k: asdict(c) for k, c in self.choices(keys).items()}}

    def describe(self, keys: tuple[str, ...] | None = None) -> str:
        """One log line: each choice with its reason."""
        return "; ".join(f"{k}={c.value} ({c.reason})" for k, c in self.choices(keys).items())

    def summary(self, stage: StagePart) -> str:
        """What ran, short, for a response's metadata: e.g. `fp8 fused, compiled, CUDA graphs on NVIDIA H200 (sm90)`."""
        if stage == "denoiser":
            kernels = f" {self.fp8_kernels.value}" if self.precision.value == "fp8" else ""
            parts = [f"{self.precision.value}{kernels}", "compiled" if self.compile.value else "eager"]
            parts += ["CUDA graphs"] if self.dit_cuda_graphs.value else []
        else:
            compiled = (self.text_encoder_compile if stage == "text_encoder" else self.vae_compile).value
            parts = [str(self.dtype.value), "compiled" if compiled else "eager"]
        return f"{', '.join(parts)} on {self.hardware.label()}"


def _switch(asked: bool | str, hardware: Hardware, auto_on: bool, auto_why: str, what: str) -> Choice:
    """A CUDA-only on/off setting: an explicit value wins on a GPU; the CPU runs eager whatever is asked."""
    if hardware.kind == "cpu":
        return Choice(False, "asked for, but applies on CUDA only" if asked is True else "the CPU runs eager")
    if asked != "auto":
        return Choice(bool(asked), "set explicitly")
    if not hardware.triton and what != "graphs":
        return Choice(False, "auto: Triton is not installed, so inductor has no GPU backend")
    return Choice(auto_on, f"auto: {auto_why}")


def resolve_speed(
    hardware: Hardware,
    precision: Literal["auto", "bf16", "fp8"] = "auto",
    fp8_kernels: Literal["auto", "inductor", "fused", "fused-bf16-attention"] = "auto",
    compile: bool | Auto = "auto",
    dit_cuda_graphs: bool | Auto = "auto",
    text_encoder_compile: bool | Auto = "auto",
    vae_compile: bool | Auto = "auto",
) -> Speed:
    """Each setting's value on `hardware`, with its reason (see the module docstring for the rules)."""
    cpu = hardware.kind == "cpu"
    dtype = Choice("float32", "the CPU runs float32") if cpu else Choice("bf16", "bf16 on the GPU")
    compiled = _switch(compile, hardware, True, "regional compile of the DiT blocks", "compile")
    graphs = _switch(dit_cuda_graphs, hardware, True, "batch-1 DiT forwards replayed from CUDA graphs", "graphs")
    te = _switch(text_encoder_compile, hardware, True, "compiled decoder layers inside the CUDA graphs", "compile")
    vae = _switch(vae_compile, hardware, True, "compiled decoder", "compile")
    capability = hardware.capability or (0, 0)
    hopper_fused = capability[0] == HOPPER and hardware.triton
    if cpu:
        why = f"{precision} asked for, but FP8 and bf16 apply on CUDA only" if precision != "auto" else ""
        chosen = Choice("float32", why or "the CPU runs float32")
    elif precision != "auto":
        chosen = Choice(precision, "set explicitly")
    elif capability < FP8_MIN_CAPABILITY:
        chosen = Choice("bf16", f"auto: sm{capability[0]}{capability[1]} has no FP8 tensor cores (sm89 and up)")
    elif not (hopper_fused or compiled.value) and fp8_kernels in ("auto", "inductor"):
        chosen = Choice("bf16", "auto: FP8 through inductor needs compile, which is off")
    else:
        chosen = Choice("fp8", "auto: FP8 DiT linears, the fastest path on an FP8 GPU")
    if chosen.value != "fp8":
        kernels = Choice(None, f"no FP8 ({chosen.value})")
    elif fp8_kernels != "auto":
        kernels = Choice(fp8_kernels, "set explicitly")
    elif hopper_fused and hardware.cudnn_frontend:
        kernels = Choice("fused", "auto: Hopper with cuDNN's frontend: fused Triton kernels and cuDNN FP8 attention")
    elif hopper_fused:
        kernels = Choice("fused-bf16-attention",
                         "auto: Hopper without nvidia-cudnn-frontend (pip install '.[gpu]' for FP8 attention)")
    else:
        kernels = Choice("inductor", "auto: torchao's FP8 linears with inductor (fused kernels: Hopper only)")
    return Speed(hardware, dtype, chosen, kernels, compiled, graphs, te, vae)
