"""The replicas' logs carry no known harmless library warning, and say once why."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_stage_import_logs_no_known_harmless_warning_and_says_once_why():
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "import deployments.denoiser.deployment, deployments.vae.deployment\n"
            "import deployments.denoiser.dit.fp8, diffusers.quantizers.torchao.torchao_quantizer\n"
            "logging.getLogger('torchao').warning('Failed to load x.so: Could not load this library')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    for text in ("Failed to load", "register_constant()", "Unable to import `torchao`", "pip install accelerate"):
        assert text not in log, log
    assert log.count("Silenced known harmless warnings") == 1, log


def test_other_warnings_of_those_loggers_pass(caplog):
    from deployments.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("something new went wrong")
    assert "something new went wrong" in caplog.text
