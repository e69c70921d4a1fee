"""In-process stand-ins for Ray Serve deployment handles, for testing orchestration without Serve.

`LocalHandle(obj).method.remote(*args)` returns an awaitable task, as a `DeploymentHandle` returns a
`DeploymentResponse`; a task passed as an argument to another call is awaited first, as Serve
resolves a response passed on to another deployment. The objects behind them are the real stage
classes (`Deployment.func_or_class`), constructed as plain Python objects on the CPU.
"""

from __future__ import annotations

import asyncio
from typing import Any


class LocalHandle:
    def __init__(self, target: Any):
        self.target = target
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> "_LocalMethod":
        return _LocalMethod(self, name)


class _LocalMethod:
    def __init__(self, handle: LocalHandle, name: str):
        self.handle = handle
        self.name = name

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Task:
        async def call() -> Any:
            resolved = [await a if isinstance(a, asyncio.Future) else a for a in args]
            self.handle.calls.append(self.name)
            return await getattr(self.handle.target, self.name)(*resolved, **kwargs)

        return asyncio.ensure_future(call())


async def close_all(handles) -> None:
    """Stops the batchers' tasks of the stages behind `handles` (on the loop they run on, before it closes:
    a closed loop's pending task is reported as destroyed when it is collected)."""
    for handle in handles:
        close = getattr(handle.target, "aclose", None)
        if close is not None:
            await close()
