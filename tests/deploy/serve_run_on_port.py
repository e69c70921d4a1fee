"""Ray Serve's `serve run` command as installed, with only its HTTP address moved to 127.0.0.1:PORT.

The import-path form (`serve run serve_app:build_app`, the README's) always binds port 8000; a test
that runs it beside whatever already listens there (a quick-start server) moves the port and changes
nothing else. Usage: `python serve_run_on_port.py PORT <serve run arguments>`.
"""

from __future__ import annotations

import sys

from ray.serve import scripts


def main(port: int, arguments: list[str]) -> None:
    start = scripts._private_api.serve_start

    def serve_start(http_options: dict | None = None, **kwargs):
        return start(http_options={**(http_options or {}), "host": "127.0.0.1", "port": port}, **kwargs)

    scripts._private_api.serve_start = serve_start
    scripts.cli(["run", *arguments], prog_name="serve")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
