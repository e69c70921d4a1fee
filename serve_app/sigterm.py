"""SIGTERM stops `serve run` as Ctrl-C does: Serve shut down, exit status 0, no stack dump.

`ray.init` sets a SIGTERM handler that exits with status 15, and the core worker it connects installs
a failure-signal handler that first prints a native stack trace ("SIGTERM received ...
clock_nanosleep"), which reads as a crash. `serve run` calls the application builder before it starts
Ray, so the builder registers a hook that Ray runs right after `ray.init` has connected (its post-init
hooks, as Ray's own libraries use) and that hook makes SIGTERM raise KeyboardInterrupt in the main
thread: `serve run` then takes its Ctrl-C path (`serve.shutdown()`, exit 0). Only the driver's
handler changes; replicas and Ray's own processes keep theirs.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one shutdown: a second SIGTERM does not cut it short
    raise KeyboardInterrupt(f"signal {signum}")


def _install() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def stop_on_sigterm_as_on_ctrl_c() -> bool:
    """In a driver that has not started Ray yet (`serve run` calling the builder), registers the hook;
    True when it did. Elsewhere (a replica, a test that started Ray first) it changes nothing."""
    import ray
    from ray._private import worker

    if ray.is_initialized() or threading.current_thread() is not threading.main_thread():
        return False
    if _install not in worker._post_init_hooks:
        worker._post_init_hooks.append(_install)
    return True
