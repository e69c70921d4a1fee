"""Known harmless warnings of the libraries under us, dropped from the replicas' logs and said once why.

A new user reads a warning as something wrong. These say nothing about this server:
- torchao's optional C++/CUDA extensions (mxfp8, CUTLASS) that its wheel ships built for other
  Python or CUDA versions fail to load; FP8 here runs through torchao's Python FP8 linears with
  inductor, or through our own Triton kernels, neither of which uses them;
- torch deprecates `register_constant()` on Enum classes, which torchao still calls at import;
- diffusers could not import torchao's tensor subclasses for loading torchao-serialized
  checkpoints, which this server never loads.
Each is dropped by a logging filter on its own logger, matched by its text; the first one a process
drops is replaced by one INFO line that says why it is harmless (the rest at DEBUG). Plain `logging`: importing
this module imports neither torch nor the libraries (the filters go on before they log).
"""

from __future__ import annotations

import logging

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


_said = False


class _Known(logging.Filter):
    def __init__(self, text: str, why: str):
        super().__init__()
        self.text, self.why = text, why

    def filter(self, record: logging.LogRecord) -> bool:
        global _said
        if self.text not in record.getMessage():
            return True
        if not _said:
            _said = True
            logger.info("Silenced known harmless warnings of torchao, torch and diffusers "
                        "(deployments/runtime/quiet.py); the first: %s.", self.why)
        else:
            logger.debug("Silenced a harmless library warning: %s.", self.why)
        return False


def quiet_known_warnings() -> None:
    """Installs the filters (once per process)."""
    for name, text, why in KNOWN:
        target = logging.getLogger(name)
        if not any(isinstance(f, _Known) and f.text == text for f in target.filters):
            target.addFilter(_Known(text, why))
