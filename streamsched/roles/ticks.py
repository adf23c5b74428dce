"""Work that many asyncio tasks ask for in one loop tick, done once for all of them.

A master takes in many submissions at once, each its own asyncio task; those that
register a waiting task in the same turn of the loop share one batch of publishes and
one re-check, instead of a few round trips each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TickBatch(Generic[T]):
    """Collects the items added in one loop tick (at most ``max_items``) and hands them to
    ``handle`` together; each :meth:`add` returns once its batch was handled, or raises its error."""

    def __init__(self, handle: Callable[[list[T]], Awaitable[None]], *, max_items: int) -> None:
        self.handle = handle
        self.max_items = max_items
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._running: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly

    async def add(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        if not self._items:
            loop.call_soon(self._flush)
        waiter: asyncio.Future[None] = loop.create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        if len(self._items) >= self.max_items:
            self._flush()
        await waiter

    def _flush(self) -> None:
        if not self._items:
            return
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        task = asyncio.get_running_loop().create_task(self._run(items, waiters))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, items: list[T], waiters: list[asyncio.Future[None]]) -> None:
        try:
            await self.handle(items)
        except Exception as exc:  # noqa: BLE001 - every item of the batch fails with it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
