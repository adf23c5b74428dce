"""CPU per call of a sync handler through :class:`streamsched.roles.threads.HandlerThreads` and
through ``anyio.to_thread.run_sync`` with a limiter (the obvious alternative, which
costs two to three times as much per call).

``python -m streamsched.bench.thread_cost``
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from ..roles.threads import HandlerThreads


def compare(calls: int = 20_000, concurrency: int = 16) -> None:
    """Print the CPU per call of both, twice each, in turns."""

    def nothing() -> None:
        return None

    async def main() -> None:
        pool = HandlerThreads(concurrency)
        limiter = anyio.CapacityLimiter(concurrency)

        async def via_pool() -> None:
            await pool.run(nothing, 10.0, TimeoutError)

        async def via_anyio() -> None:
            with anyio.fail_after(10.0):
                await anyio.to_thread.run_sync(nothing, abandon_on_cancel=True, limiter=limiter)

        for name, one in (("HandlerThreads", via_pool), ("anyio.to_thread", via_anyio)) * 2:
            slots = asyncio.Semaphore(concurrency)

            async def bounded(one: Callable[[], Any] = one, slots: asyncio.Semaphore = slots) -> None:
                async with slots:
                    await one()

            began = time.process_time()
            await asyncio.gather(*(bounded() for _ in range(calls)))
            print(f"{name:16} {1e6 * (time.process_time() - began) / calls:6.1f} µs of CPU per call")

    asyncio.run(main())


if __name__ == "__main__":
    compare()
