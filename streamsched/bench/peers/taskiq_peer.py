"""taskiq + taskiq-nats (JetStream pull): ``--workers 1``, ``pull_consume_batch=100``,
``pull_consume_timeout=1``, submitted with ``gather(kiq())`` in windows of 1000.

The tuned taskiq setup: the default batch of 1 costs a pull request per task, and a
sequential ``kiq`` loop caps the submit rate; this setup fixes both (README.md has the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from taskiq_nats import PullBasedJetStreamBroker

from . import recorder

NAME = "taskiq+taskiq-nats"
CONFIG = "batch 100, gather"
BROKER = "nats"
N = 10_000
WINDOW = 1000


async def _noop(submitted_at: float) -> None:
    recorder.record(submitted_at)


def build(url: str) -> tuple[PullBasedJetStreamBroker, Any]:
    broker = PullBasedJetStreamBroker(
        servers=url,
        subject="peers_taskiq",
        stream_name="peers_taskiq",
        durable="peers_taskiq",
        pull_consume_batch=100,
        pull_consume_timeout=1.0,
    )
    return broker, broker.task(task_name="noop")(_noop)


#: What ``taskiq worker module:broker`` loads in the worker process (see ``recorder.BROKER_URL_ENV``).
broker = build(os.environ[recorder.BROKER_URL_ENV])[0] if recorder.BROKER_URL_ENV in os.environ else None


def worker() -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "taskiq", "worker", f"{__name__}:broker", "--workers", "1"]
    return [*command, "--max-async-tasks", "100", "--log-level", "WARNING"], {}


@contextlib.asynccontextmanager
async def submitter(url: str) -> AsyncIterator[Callable[[int, bool], Awaitable[None]]]:
    client, noop = build(url)
    # Creates the stream and the durable consumer before the worker starts.
    await client.startup()

    async def send(count: int, stamped: bool) -> None:
        for start in range(0, count, WINDOW):
            await asyncio.gather(*[noop.kiq(time.time() if stamped else 0.0) for _ in range(min(WINDOW, count - start))])

    try:
        yield send
    finally:
        await client.shutdown()
