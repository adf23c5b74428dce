"""Dramatiq + Redis: one process of 8 threads, queue prefetch 64, an ``actor.send`` loop.

The best obvious Dramatiq setup for two cores: two processes are slower than one there,
and prefetch 64 beats the default (2 x threads). ``group(...).run()`` is slower than a
plain loop (README.md has the figures).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from . import blocking_sender, recorder

NAME = "dramatiq+redis"
CONFIG = "1 x 8 threads"
BROKER = "redis"
N = 10_000


def build(url: str) -> tuple[RedisBroker, Any]:
    # The broker is passed explicitly rather than set as Dramatiq's global one, so the bench
    # process's submitter leaves no state behind.
    broker = RedisBroker(url=url)
    return broker, dramatiq.actor(actor_name="noop", queue_name="peers", max_retries=0, broker=broker)(recorder.record)


#: What ``dramatiq module:broker`` loads in the worker process (see ``recorder.BROKER_URL_ENV``).
broker = build(os.environ[recorder.BROKER_URL_ENV])[0] if recorder.BROKER_URL_ENV in os.environ else None


def worker() -> tuple[list[str], dict[str, str]]:
    # Dramatiq takes its queue prefetch from the environment only.
    return [sys.executable, "-m", "dramatiq", f"{__name__}:broker", "--processes", "1", "--threads", "8"], {"dramatiq_queue_prefetch": "64"}


@contextlib.asynccontextmanager
async def submitter(url: str) -> AsyncIterator[Callable[[int, bool], Awaitable[None]]]:
    client, noop = build(url)
    try:
        yield blocking_sender(lambda submitted_at: noop.send(submitted_at))
    finally:
        client.close()
