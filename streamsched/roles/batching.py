"""Batch handlers (``@task(..., batch_size=N, batch_wait_s=W)``): many tasks in one call.

Each task keeps its own life in the worker (its handler slot, heartbeat, ``started``,
outcome, ack, retries): only the call is shared. A task's turn to run puts its payload
in the open batch of its type and waits for its own result; the batch is called when it
holds ``batch_size`` payloads, or ``batch_wait_s`` after its first. Since every waiting
task holds a slot, a batch never holds more tasks than the worker has slots
(``batch_size`` is capped at the worker's concurrency, so a full batch does not wait
for slots that cannot come).

The handler returns a list of as many results as payloads, in order. An exception
instance in place of a result is that task's error alone; an exception raised by the
handler (or a list of the wrong length) is the error of every task of the call, each
then retried (or dead-lettered) on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from typing import Any

from ..errors import TaskTimeout
from ..registry import TaskContext, TaskDef, _current_batch
from .threads import HandlerThreads


class _Item:
    __slots__ = ("context", "future", "payload")

    def __init__(self, payload: Any, context: TaskContext, future: asyncio.Future[Any]) -> None:
        self.payload = payload
        self.context = context
        self.future = future


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark an item's error as seen: its task may have stopped waiting (cancelled)."""
    if not future.cancelled():
        future.exception()


class Batches:
    """The open batch of one batch handler in one worker, and its calls."""

    def __init__(self, definition: TaskDef, threads: HandlerThreads, loop: asyncio.AbstractEventLoop, max_size: int) -> None:
        assert definition.batch_size is not None
        self.definition = definition
        self.size = min(definition.batch_size, max_size)
        self.threads = threads
        self._loop = loop
        self._open: list[_Item] = []
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly

    async def run(self, payload: Any, context: TaskContext) -> Any:
        """This task's result from a call of the handler with the payloads of its batch."""
        future: asyncio.Future[Any] = self._loop.create_future()
        future.add_done_callback(_retrieved)
        self._open.append(_Item(payload, context, future))
        if len(self._open) >= self.size:
            self._call_open()
        elif self._timer is None:
            self._timer = self._loop.call_later(self.definition.batch_wait_s, self._call_open)
        # Shielded: a task cancelled while it waits leaves the batch's call alone.
        return await asyncio.shield(future)

    def _call_open(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._open = self._open, []
        if items:
            # A context of its own: the handler sees current_batch(), not the first task's current_task().
            call = self._loop.create_task(self._call(items), context=contextvars.Context())
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _call(self, items: list[_Item]) -> None:
        definition = self.definition
        _current_batch.set(tuple(item.context for item in items))
        payloads = [item.payload for item in items]
        timeout = definition.timeout_s
        try:
            if definition.is_async:
                async with asyncio.timeout(timeout):
                    results = await definition.fn(payloads)
            else:
                results = await self.threads.run(functools.partial(definition.fn, payloads), timeout, TaskTimeout)
            if not isinstance(results, list) or len(results) != len(items):
                got = f"{len(results)} results" if isinstance(results, list) else type(results).__name__
                raise TypeError(f"batch handler {definition.name!r} returned {got} for {len(items)} payloads (a list of as many is needed)")
        except TimeoutError:
            self._settle_all(items, TaskTimeout(f"batch call timed out after {timeout}s"))
            return
        except Exception as exc:  # noqa: BLE001 - the error of every task of the call
            self._settle_all(items, exc)
            return
        for item, result in zip(items, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    @staticmethod
    def _settle_all(items: list[_Item], error: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
