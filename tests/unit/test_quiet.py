"""The replicas' logs carry no known harmless library warning, and say once why."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_stage_import_logs_no_known_harmless_warning_nor_progress_bar():
    """The warnings concern FP8: until the process runs FP8 (the CPU, bf16, the other stages) nothing of
    them is said at INFO; once a Denoiser says it runs FP8, one line says why they are harmless.
    Progress bars are off."""
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "import deployments.denoiser.deployment, deployments.vae.deployment\n"
            "import deployments.denoiser.dit.fp8, diffusers.quantizers.torchao.torchao_quantizer\n"
            "logging.getLogger('torchao').warning('Failed to load x.so: Could not load this library')\n"
            "import transformers.utils.logging, huggingface_hub.utils\n"
            "print('bars', transformers.utils.logging.is_progress_bar_enabled(),"
            " huggingface_hub.utils.are_progress_bars_disabled(), flush=True)\n"
            "import sys; print('FP8 FROM HERE', file=sys.stderr, flush=True)\n"
            "from deployments.runtime.quiet import say_why_where_fp8_runs; say_why_where_fp8_runs()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    for text in ("Failed to load", "register_constant()", "Unable to import `torchao`", "pip install accelerate"):
        assert text not in log, log
    before, _, after = out.stderr.partition("FP8 FROM HERE")
    assert "Silenced known harmless warnings" not in before and after.count("Silenced known harmless warnings") == 1, log
    assert "bars False True" in out.stdout, log


def test_other_warnings_of_those_loggers_pass(caplog):
    from deployments.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("something new went wrong")
    assert "something new went wrong" in caplog.text
