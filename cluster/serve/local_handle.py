"""A DeploymentHandle's calling surface over an object in this process.

When an app has exactly one model replica, the ingress routes live in that replica
(AppConfig.colocate_ingress): the ingress code still calls `handle.method.remote(...)`, and
this adapter runs the method here instead of sending it over Serve. A token stream is then a
plain async generator read by the HTTP / gRPC handler: no per-item hop between processes.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator


_closing: set[asyncio.Task] = set()  # generator closes still running


class LocalStream:
    """What `handle.options(stream=True).method.remote()` returns: an async iterator with
    `cancel()`. Cancelling closes the generator, which runs its cleanup (the engine aborts)."""

    def __init__(self, gen: AsyncIterator[Any]) -> None:
        self._gen = gen

    def __aiter__(self) -> "LocalStream":
        return self

    async def __anext__(self) -> Any:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        task = asyncio.get_running_loop().create_task(self._gen.aclose())
        _closing.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_closing.discard)


class _LocalMethod:
    def __init__(self, fn) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any):
        """An async generator method gives a LocalStream; anything else a coroutine that runs
        the method when awaited (as a handle's response resolves)."""
        if inspect.isasyncgenfunction(self._fn):
            return LocalStream(self._fn(*args, **kwargs))
        return self._call(*args, **kwargs)

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        result = self._fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


class LocalHandle:
    def __init__(self, target: Any) -> None:
        self._target = target

    def options(self, **_: Any) -> "LocalHandle":
        """Stream / transport options mean nothing in-process."""
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self._target, name))
