"""`python -m serve_app.serve_run serve_config.yaml` (installed: `zimage-serve-run`): Ray Serve's own
`serve run`, arguments and behaviour unchanged, except that SIGTERM stops it as Ctrl-C does (Serve
shut down, exit status 0, no native stack dump) with a config file too.

With an import path, `serve run` calls our builder in its own process before it starts Ray, and the
builder registers the SIGTERM hook (serve_app.sigterm). With a config file it never does: the
controller builds the application, so nothing of ours runs in the command and Ray's handler, which
prints a stack dump, stays. This entry point registers the same hook first, then hands over to
`serve run`.
"""

from __future__ import annotations

import sys

from serve_app.sigterm import stop_on_sigterm_as_on_ctrl_c


def main(argv: list[str] | None = None) -> None:
    from ray.serve.scripts import cli

    stop_on_sigterm_as_on_ctrl_c()
    cli(["run", *(sys.argv[1:] if argv is None else argv)], prog_name="serve")


if __name__ == "__main__":
    main()
