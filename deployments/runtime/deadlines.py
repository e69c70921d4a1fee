"""A request's deadline as it travels to the stages: an absolute wall-clock time (`time.time()`),
so that it means the same on every node; `None` is no deadline."""

from __future__ import annotations

import time


class DeadlineExceeded(Exception):
    """The request's deadline passed before its work finished; the work was dropped."""

    def __init__(self, message: str = "the request's deadline passed"):
        super().__init__(message)


def past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline
