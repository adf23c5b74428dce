"""The threads that run sync handlers: results, errors, context, timeouts, stuck calls."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from streamsched.roles.threads import HandlerThreads

pytestmark = pytest.mark.anyio

REQUEST = contextvars.ContextVar("request", default="none")


class Stop(Exception):
    pass


async def test_a_call_runs_in_a_daemon_thread_with_the_callers_context():
    threads = HandlerThreads(2)
    REQUEST.set("r1")

    def where() -> tuple[str, bool, str]:
        current = threading.current_thread()
        return current.name, current.daemon, REQUEST.get()

    name, daemon, request = await threads.run(where, 5.0, Stop)
    assert name.startswith("streamsched-handler-") and daemon and request == "r1"
    with pytest.raises(ZeroDivisionError):
        await threads.run(lambda: 1 / 0, 5.0, Stop)


async def test_at_most_size_calls_run_at_once():
    threads = HandlerThreads(3)
    running, most = 0, 0
    lock = threading.Lock()

    def busy() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    await asyncio.gather(*(threads.run(busy, 5.0, Stop) for _ in range(12)))
    assert most == 3


async def test_a_timeout_is_raised_in_the_caller_and_inside_the_thread():
    threads = HandlerThreads(1)
    stopped = threading.Event()

    def spin() -> None:
        try:
            while True:
                time.sleep(0.005)
        except Stop:
            stopped.set()

    with pytest.raises(TimeoutError):
        await threads.run(spin, 0.05, Stop)
    assert await asyncio.to_thread(stopped.wait, 2.0)
    assert await threads.run(lambda: "next", 5.0, Stop) == "next"


async def test_a_stuck_call_does_not_take_its_slot_for_good():
    threads = HandlerThreads(1)
    release = threading.Event()
    # Blocked in C, it cannot see the timeout until it returns.
    with pytest.raises(TimeoutError):
        await threads.run(lambda: release.wait(5.0), 0.05, Stop)
    try:
        assert await threads.run(lambda: "ran beside it", 2.0, Stop) == "ran beside it"
    finally:
        release.set()


async def test_close_ends_the_idle_threads():
    before = set(threading.enumerate())
    threads = HandlerThreads(4)
    await asyncio.gather(*(threads.run(lambda: time.sleep(0.01), 5.0, Stop) for _ in range(4)))
    ours = [t for t in threading.enumerate() if t not in before]
    threads.close()
    for thread in ours:
        thread.join(timeout=2.0)
    assert ours and not any(thread.is_alive() for thread in ours)
