"""Celery + Redis: ``-P solo``, prefetch-multiplier 64, no result backend, an ``apply_async`` loop.

The best obvious Celery setup for two cores: solo beats prefork there (the submitter and
Redis need the second core), and the result backend and the gossip/mingle/heartbeat
chatter are off, since the workload needs none of them (README.md has the figures).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from celery import Celery

from . import blocking_sender, recorder

NAME = "celery+redis"
CONFIG = "solo, prefetch 64"
BROKER = "redis"
N = 5_000


def build(url: str) -> tuple[Celery, Any]:
    app = Celery("streamsched-peers", broker=url)
    app.conf.update(
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app, app.task(name="noop", shared=False)(recorder.record)


#: What ``celery -A`` loads in the worker process (see ``recorder.BROKER_URL_ENV``).
app = build(os.environ[recorder.BROKER_URL_ENV])[0] if recorder.BROKER_URL_ENV in os.environ else None


def worker() -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "celery", "-A", __name__, "worker", "-P", "solo", "-c", "1"]
    command += ["--prefetch-multiplier", "64", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning"]
    return command, {}


@contextlib.asynccontextmanager
async def submitter(url: str) -> AsyncIterator[Callable[[int, bool], Awaitable[None]]]:
    client, noop = build(url)
    try:
        yield blocking_sender(lambda submitted_at: noop.apply_async((submitted_at,)))
    finally:
        client.close()
