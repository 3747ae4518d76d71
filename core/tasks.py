"""Work that outlives the request that started it (an export), owned by the app's lifespan.

``BackgroundTasks.spawn`` starts a task and keeps a reference to it (asyncio keeps only weak ones);
at most ``concurrency`` run at once, the others wait their turn (background work must not take
every database connection from requests); a task that fails is logged, never raised into anyone;
``close`` cancels what still runs or waits and waits for it (the lifespan's exit). ``idle`` waits
until every task started so far has ended (tests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("atrium.tasks")


class BackgroundTasks:
    def __init__(self, concurrency: int = 2) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._slots = asyncio.Semaphore(concurrency)

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``work`` in the background; refused (``RuntimeError``) once closed."""
        if self._closed:
            work.close()
            raise RuntimeError("background tasks are closed")
        task = asyncio.ensure_future(self._in_turn(work))
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        # A task cancelled before it ever ran never started ``work``: close it (no "never awaited").
        task.add_done_callback(lambda _: work.close())
        return task

    async def _in_turn(self, work: Coroutine[Any, Any, None]) -> None:
        async with self._slots:
            await work

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    async def idle(self) -> None:
        """Return once every task started so far has ended."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Cancel every running task and wait for them; no task starts afterwards."""
        self._closed = True
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
