"""Example handlers: copy one to start your own. `streamsched up` loads this module."""

from __future__ import annotations

import time
from typing import Any

from streamsched import Fail, current_task, task


@task("echo")
def echo(payload: Any) -> Any:
    """Returns its payload."""
    return payload


@task("noop")
async def noop(payload: Any) -> None:
    """Does nothing, on the event loop (the cheapest possible task, for benchmarks)."""


@task("sleep", timeout_s=3600)
def sleep(payload: dict[str, float] | None) -> float:
    """Sleeps ``payload["seconds"]`` (default 1) in a thread, a tenth of a second at a time so
    that a cancel stops it (a sync handler checks ``current_task().cancelled`` itself);
    returns the seconds slept."""
    seconds = float((payload or {}).get("seconds", 1.0))
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not current_task().cancelled:
        time.sleep(min(0.1, left))
    return seconds - max(0.0, deadline - time.monotonic())


@task("fail")
def fail(payload: Any) -> None:
    """Always raises a retryable error, so it ends dead after max_attempts."""
    raise RuntimeError(f"fail always fails (payload {payload!r})")


@task("fail_permanent")
def fail_permanent(payload: Any) -> None:
    """Raises Fail: no retry, the task ends failed at once."""
    raise Fail(f"fail_permanent refuses payload {payload!r}")
