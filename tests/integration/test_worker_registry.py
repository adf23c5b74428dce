"""The worker registry against a real server: entries in KV `workers`, the live view, drain."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

import streamsched
from streamsched import subjects
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.errors import NotFound
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.registry import Registry
from streamsched.roles.worker import Worker
from streamsched.roles.worker_registry import LiveWorkers, WorkerInfo, live_workers
from streamsched.testing import EventLog, all_roles, running
from streamsched.transport import streams
from streamsched.transport.bus import Bus

from .test_cli import cli

pytestmark = pytest.mark.anyio

T = TypeVar("T")
#: Heartbeats this often in these tests, so counts show and entries expire within a second or two.
HEARTBEAT_S = 0.2


@pytest.fixture
async def fast(settings: Settings, bus: Bus) -> Settings:
    """The test's settings with quick heartbeats, and the bucket's TTL set to match."""
    quick = msgspec.structs.replace(settings, worker_heartbeat_s=HEARTBEAT_S)
    await streams.apply(bus, quick)
    return quick


async def eventually(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], *, what: str, timeout_s: float = 10.0) -> T:
    """``probe()`` once ``ok`` holds for it; fails with the last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not ok(value := await probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout_s}s; last: {value!r}")
        await anyio.sleep(0.05)
    return value


async def until(condition: Callable[[], bool], *, what: str, timeout_s: float = 10.0) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, bool, what=what, timeout_s=timeout_s)


def entry(worker_id: str, **fields: object) -> bytes:
    """A registry entry as a worker of region ``default`` handling ``a`` would put it."""
    now = time.time()
    base: dict[str, object] = dict(id=worker_id, host="h", pid=1, region="default", types=("a",), concurrency=1, prefetch=1, version="t")
    base.update(started_at=now, heartbeat_at=now, heartbeat_s=60.0)
    return msgspec.json.encode(WorkerInfo(**{**base, **fields}))


async def test_a_worker_registers_with_its_handlers_reports_what_it_finished_and_deregisters_when_it_stops(fast, bus, examples: Registry):
    worker = Worker(fast, bus, examples, region="default", concurrency=3, prefetch=1)
    client = Client(bus, await StateStore.open(bus))
    async with running([*await all_roles(fast, bus, None), worker]):
        [info] = await eventually(lambda: live_workers(bus), lambda found: len(found) == 1, what="registered worker")
        assert (info.id, info.host, info.pid, info.region) == (worker.id, socket.gethostname(), os.getpid(), "default")
        assert info.types == tuple(examples.names()) and "echo" in info.types
        assert (info.concurrency, info.prefetch, info.state, info.version) == (3, 1, "running", streamsched.__version__)
        assert info.heartbeat_s == HEARTBEAT_S

        handles = [await client.submit("echo", {"n": n}) for n in range(4)]
        for handle in handles:
            await handle.result(timeout_s=20)
        [info] = await eventually(
            lambda: live_workers(bus), lambda found: found and found[0].finished.get("succeeded") == 4, what="four successes counted"
        )
        assert (info.running, info.waiting) == (0, 0)
        assert info.heartbeat_at > info.started_at
    # Deleted on the way out, not left to expire.
    assert await live_workers(bus) == []
    kv = await bus.js.key_value(subjects.WORKERS_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await kv.get(subjects.worker_key(worker.id))


async def test_live_workers_handles_a_type_once_a_worker_of_its_region_registers_and_not_after_it_deregisters(fast, bus, examples: Registry):
    live = LiveWorkers(bus)
    await live.start()
    try:
        assert not live.handles("default", "echo") and live.types_in("default") == set()
        async with running([Worker(fast, bus, examples, region="default", concurrency=1)]):
            await until(lambda: live.handles("default", "echo"), what="echo handled in default")
            assert live.types_in("default") == set(examples.names())
            assert not live.handles("eu", "echo") and not live.handles("default", "no-such-type")
        await until(lambda: not live.handles("default", "echo"), what="echo no longer handled")
        assert live.types_in("default") == set() and live.workers() == []
    finally:
        await live.stop()


async def test_a_stale_or_draining_worker_handles_nothing_and_a_stale_one_that_heartbeats_again_counts_again(bus):
    kv = await bus.js.key_value(subjects.WORKERS_BUCKET)
    await kv.put("stale", entry("stale", types=("old",), heartbeat_at=time.time() - 200))  # 200 s > 3 heartbeats of 60 s
    await kv.put("draining", entry("draining", types=("drained",), state="draining"))
    await kv.put("fresh", entry("fresh"))
    live = LiveWorkers(bus)
    small = LiveWorkers(bus, limit=2)
    await live.start()
    await small.start()
    try:
        assert live.types_in("default") == {"a"}
        assert not live.handles("default", "old") and not live.handles("default", "drained")
        assert [info.id for info in live.workers()] == [info.id for info in await live_workers(bus)] == ["draining", "fresh"]
        assert list(small.entries) == ["draining", "fresh"], "past its limit, the least recently heard of goes"

        await kv.put("stale", entry("stale", types=("old",)))
        await until(lambda: live.handles("default", "old"), what="the returning worker counted")
        await kv.delete("fresh")
        await until(lambda: not live.handles("default", "a"), what="the deleted worker gone")
    finally:
        await live.stop()
        await small.stop()


async def test_drain_lets_the_running_task_finish_then_the_worker_deregisters_and_returns(fast, bus, examples: Registry, events: EventLog):
    worker = Worker(fast, bus, examples, region="default", concurrency=1)
    client = Client(bus, await StateStore.open(bus))
    with pytest.raises(NotFound, match="no live worker nobody-1"):
        await client.drain_worker("nobody-1")
    async with running(await all_roles(fast, bus, None)):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await client.submit("sleep", {"seconds": 1.0}, id="in-flight-at-drain")
                await events.wait(lambda log: "started" in log.kinds_of("in-flight-at-drain"), timeout_s=20, what="the task's start")
                answer = await client.drain_worker(worker.id)
                assert (answer.id, answer.state, answer.running) == (worker.id, "draining", 1)
                [listed] = await live_workers(bus)
                assert listed.state == "draining"
                await client.drain_worker(worker.id, timeout_s=20)  # asked again (it answers while it drains), waits until gone
            # The task group ended: run() returned by itself after the drain.
    final = events.final("in-flight-at-drain")
    assert final is not None and ev.kind(final) == "succeeded" and final.attempt == 1
    assert await live_workers(bus) == []


async def test_streams_apply_keeps_the_workers_and_regions_buckets_ttl_at_three_heartbeats(settings, bus):
    heartbeats = (subjects.WORKERS_BUCKET, subjects.REGIONS_BUCKET)
    for bucket in heartbeats:
        assert (await (await bus.js.key_value(bucket)).status()).ttl == 3 * settings.worker_heartbeat_s
    changes = {c.name: c for c in await streams.apply(bus, msgspec.structs.replace(settings, worker_heartbeat_s=0.5)) if c.kind == "kv"}
    for bucket in heartbeats:
        assert (changes[bucket].action, changes[bucket].detail) == ("updated", "ttl")
        assert (await (await bus.js.key_value(bucket)).status()).ttl == 1.5
    assert {c.action for name, c in changes.items() if name not in heartbeats} == {"unchanged"}


async def test_the_cli_says_when_no_worker_is_live_or_none_has_the_id_to_drain(settings, bus):
    empty = await cli(settings, "workers", "list")
    assert empty.stdout == b"" and b"no live workers" in empty.stderr
    assert (await cli(settings, "workers", "list", "--json")).stdout == b""
    missing = await cli(settings, "workers", "drain", "nobody-1", check=False)
    assert missing.returncode == 3 and b"no live worker nobody-1" in missing.stderr
