"""Known harmless warnings of the libraries under us, dropped from the replicas' logs and said once why.

A new user reads a warning as something wrong. These say nothing about this server:
- torchao's optional C++/CUDA extensions (mxfp8, CUTLASS) that its wheel ships built for other
  Python or CUDA versions fail to load; FP8 here runs through torchao's Python FP8 linears with
  inductor, or through our own Triton kernels, neither of which uses them;
- torch deprecates `register_constant()` on Enum classes, which torchao still calls at import;
- diffusers could not import torchao's tensor subclasses for loading torchao-serialized
  checkpoints, which this server never loads.
Each is dropped by a logging filter on its own logger, matched by its text, and noted at DEBUG. They
all concern FP8: in a replica that runs the DiT in FP8 (`say_why_where_fp8_runs`), where an operator
might connect them with FP8, one INFO line says why they are harmless; elsewhere (the CPU, bf16, the
other stages) nothing at INFO. Plain `logging`: importing this module imports neither torch nor the
libraries (the filters go on before they log).

Progress bars (huggingface_hub's downloads, transformers' "Loading weights" and "Writing model
shards") are off too: a bar redrawn in a replica's log is noise, and the stages log their own start
phases. `HF_HUB_DISABLE_PROGRESS_BARS=0` in the environment brings them back.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ray.serve")

# (logger name, text the message contains, why it is harmless)
KNOWN: tuple[tuple[str, str, str], ...] = (
    ("torchao", "Failed to load",
     "torchao's optional C++/CUDA extensions (mxfp8, CUTLASS) did not load; unused here: FP8 runs through "
     "torchao's FP8 linears with inductor or through this server's Triton kernels"),
    ("torch.utils._pytree", "register_constant() on Enum subclasses is deprecated",
     "torch deprecates register_constant() on Enum classes, which torchao calls at import; nothing changes here"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects",
     "diffusers cannot read torchao-serialized checkpoints with this torchao; this server never loads one"),
)


_first_silenced: str | None = None  # why the first warning this process dropped is harmless
_fp8_runs_here = False
_said = False


def _say_why() -> None:
    global _said
    if not _said and _first_silenced and _fp8_runs_here:
        _said = True
        logger.info("Silenced known harmless warnings of torchao, torch and diffusers "
                    "(deployments/runtime/quiet.py); the first: %s.", _first_silenced)


def say_why_where_fp8_runs() -> None:
    """Called by a replica that runs FP8: the warnings dropped (now or later) get their one INFO line."""
    global _fp8_runs_here
    _fp8_runs_here = True
    _say_why()


class _Known(logging.Filter):
    def __init__(self, text: str, why: str):
        super().__init__()
        self.text, self.why = text, why

    def filter(self, record: logging.LogRecord) -> bool:
        global _first_silenced
        if self.text not in record.getMessage():
            return True
        _first_silenced = _first_silenced or self.why
        logger.debug("Silenced a harmless library warning: %s.", self.why)
        _say_why()
        return False


def quiet_known_warnings() -> None:
    """Installs the filters (once per process) and turns progress bars off before the libraries load."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub, and transformers from it
    for name, text, why in KNOWN:
        target = logging.getLogger(name)
        if not any(isinstance(f, _Known) and f.text == text for f in target.filters):
            target.addFilter(_Known(text, why))
