"""The agent's background tasks and its operation log.

Every operation on a VM or image is logged with its outcome and duration,
and a background task that fails (pool, GC, hooks, working set) is logged
with what it was doing, instead of vanishing with its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

log = logging.getLogger("vmstream.host")


def _subject(what: str, vm: str | None, image: str | None) -> str:
    """'what vm=NAME image=NAME', naming only what there is."""
    return " ".join(p for p in (what, f"vm={vm}" if vm else "", f"image={image}" if image else "") if p)


@contextlib.asynccontextmanager
async def operation(what: str, vm: str | None = None, image: str | None = None) -> AsyncIterator[None]:
    """Log an operation's start, end, duration and outcome."""
    subject = _subject(what, vm, image)
    t0 = time.perf_counter()
    log.info("%s: started", subject)
    try:
        yield
    except BaseException as exc:
        log.warning("%s: failed after %.3f s: %s", subject, time.perf_counter() - t0, exc or type(exc).__name__)
        raise
    log.info("%s: done in %.3f s", subject, time.perf_counter() - t0)


class Tasks:
    """Owns the agent's background tasks: logs their failures, cancels them at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str, vm: str | None = None, image: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and (exc := t.exception()) is not None:
                log.error("background %s failed: %s", _subject(what, vm, image), exc or type(exc).__name__, exc_info=exc)

        task.add_done_callback(done)
        return task

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
