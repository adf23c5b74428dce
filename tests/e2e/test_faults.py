"""Faults through every role, with workers (and, for restarts, every role) as real subprocesses.

A worker SIGKILLed mid-task (and dropped from the worker registry), a worker drained by
SIGTERM, and nats-server stopped and restarted on the same port and store while workers
are idle and while they are busy.
The broker is never mocked; every process is stopped by its PID at teardown.
"""

from __future__ import annotations

import collections
import random
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.eventlog import reader as eventlog
from streamsched.eventlog.state import is_final
from streamsched.model import Status, TaskState
from streamsched.roles.worker_registry import live_workers
from streamsched.testing import EventLog, wait_drained
from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer

from .conftest import Processes, wait_exit, worker_id

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: Errors a JetStream call may raise while the server is away or recovering its streams.
UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
)


class RestartableServer:
    """The test's nats-server, which can be stopped and started again on the same port and store."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server

    async def restart(self, bus: Bus, *, timeout_s: float = 15.0) -> None:
        """Stop and start again (in a thread, so this event loop keeps running), then wait
        until ``bus`` has reconnected."""
        reconnects = bus.nc.stats["reconnects"]

        def restart() -> None:
            self.server.stop()
            self.server = NatsServer(port=self.server.port, store_dir=self.server.store_dir).start()

        await anyio.to_thread.run_sync(restart)
        deadline = time.monotonic() + timeout_s
        while bus.nc.stats["reconnects"] == reconnects or not bus.nc.is_connected:
            if time.monotonic() > deadline:
                raise AssertionError(f"the test's connection did not come back within {timeout_s}s")
            await anyio.sleep(0.02)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def restartable_server(server: NatsServer) -> Iterator[RestartableServer]:
    restartable = RestartableServer(server)
    try:
        yield restartable
    finally:
        restartable.stop()  # the replacement, if any; the fixture `server` stops the first


async def submit(client: Client, task_type: str, payload: Any, *, id: str, timeout_s: float = 15.0) -> None:
    """Submit, retrying while the server is restarting (same id, so a retry is deduped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.submit(task_type, payload, id=id)
            return
        except UNAVAILABLE:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.1)


async def final_states(client: Client, task_ids: Sequence[str], *, timeout_s: float, processes: Processes) -> dict[str, TaskState]:
    """Poll KV ``tasks`` until every task has a final state; fail with what is missing at the deadline."""
    found: dict[str, TaskState] = {}
    latest: dict[str, TaskState | None] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for task_id in [t for t in task_ids if t not in found]:
            try:
                latest[task_id] = state = await client.get(task_id)
            except UNAVAILABLE:
                break
            if state is not None and is_final(state):
                found[task_id] = state
        if len(found) == len(task_ids):
            return found
        if time.monotonic() > deadline:
            missing = {t: (s.status.value if (s := latest.get(t)) else None) for t in task_ids if t not in found}
            raise AssertionError(
                f"{len(missing)} of {len(task_ids)} tasks not final after {timeout_s}s: {dict(list(missing.items())[:10])}\n{processes.logs()}"
            )
        await anyio.sleep(0.1)


async def live_ids(bus: Bus) -> set[str]:
    """The ids of the workers the registry lists as live."""
    return {info.id for info in await live_workers(bus)}


async def event_counts(bus: Bus, kind: str) -> dict[str, int]:
    """Events of ``kind`` per task id, read from the EVENTS stream (not from a live subscription)."""
    counts: collections.Counter[str] = collections.Counter()
    async for record in eventlog.tail(bus, kind=kind):
        counts[record.event.task_id] += 1
    return dict(counts)


async def test_a_task_whose_worker_is_sigkilled_mid_run_is_redelivered_and_succeeds_on_another_worker(
    settings, bus, events: EventLog, client: Client, schedulers, processes: Processes
):
    heartbeat_s = 0.3
    processes.env["STREAMSCHED_WORKER_HEARTBEAT_S"] = str(heartbeat_s)
    first = processes.worker("worker-a", concurrency=1)
    await client.submit("sleep", {"seconds": 2.0}, id="killed-mid-run")
    await events.wait(lambda log: "started" in log.kinds_of("killed-mid-run"), timeout_s=20, what="the first start")
    assert worker_id(first) in await live_ids(bus)
    first.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert await wait_exit(first, timeout_s=5) == -signal.SIGKILL
    # Its registry entry was put at most one heartbeat before the kill, and counts for three.
    while worker_id(first) in await live_ids(bus):
        assert time.monotonic() - killed < 3 * heartbeat_s + 0.5, "the killed worker is still listed"
        await anyio.sleep(0.02)

    second = processes.worker("worker-b", concurrency=1)
    # A's heartbeats stopped with it: after ack_wait the task goes to B, which runs it again.
    final = await events.wait_final("killed-mid-run", timeout_s=settings.ack_wait_s + 20)

    starts = [(e.attempt, e.worker) for e in events.of_task("killed-mid-run") if ev.kind(e) == "started"]
    assert starts == [(1, worker_id(first)), (2, worker_id(second))], processes.logs()
    assert ev.kind(final) == "succeeded" and final.attempt == 2
    state = await client.wait("killed-mid-run", timeout_s=10)
    assert (state.status, state.attempts, state.worker) == (Status.SUCCEEDED, 2, worker_id(second))


async def test_a_worker_sent_sigterm_finishes_its_running_task_exits_zero_and_leaves_queued_work_to_others(
    settings, bus, events: EventLog, client: Client, schedulers, processes: Processes
):
    draining = processes.worker("worker-a", concurrency=1, prefetch=0)
    await client.submit("sleep", {"seconds": 1.5}, id="running-at-sigterm")
    await events.wait(lambda log: "started" in log.kinds_of("running-at-sigterm"), timeout_s=20, what="the long task's start")
    # With one slot busy and no prefetch, the next task waits on WORK: released by the region, not fetched.
    await client.submit("sleep", {"seconds": 0.1}, id="queued-at-sigterm")
    await events.wait(lambda log: "dispatched" in log.kinds_of("queued-at-sigterm"), timeout_s=10, what="the queued task on WORK")

    draining.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert await wait_exit(draining, timeout_s=settings.grace_s + 5) == 0, processes.logs()
    # It left as soon as its task was done, not at the end of the grace period.
    assert time.monotonic() - signalled < settings.grace_s
    final = await events.wait_final("running-at-sigterm", timeout_s=5)
    assert ev.kind(final) == "succeeded" and final.attempt == 1
    assert events.kinds_of("running-at-sigterm").count("started") == 1  # finished in the grace period, not handed on
    assert "started" not in events.kinds_of("queued-at-sigterm")

    successor = processes.worker("worker-b", concurrency=1)
    final = await events.wait_final("queued-at-sigterm", timeout_s=20)
    assert ev.kind(final) == "succeeded"
    assert final.attempt == 1  # the draining worker did not bounce it around (each bounce is an attempt)
    starts = [e.worker for e in events.of_task("queued-at-sigterm") if ev.kind(e) == "started"]
    assert starts == [worker_id(successor)]
    # Run once overall, as the EVENTS stream (not only the live log) records it.
    assert (await event_counts(bus, "started")).get("queued-at-sigterm") == 1
    assert (await event_counts(bus, "succeeded")).get("queued-at-sigterm") == 1


async def test_a_worker_sent_sigterm_runs_the_tasks_it_prefetched_within_the_grace_period(
    settings, bus, events: EventLog, client: Client, schedulers, processes: Processes
):
    """A task that waits in a draining worker for its slot is run there, once, on its first
    delivery: handing it back would count a delivery, so an attempt, it never had."""
    draining = processes.worker("worker-a", concurrency=1, prefetch=1)
    await client.submit("sleep", {"seconds": 1.0}, id="running-at-sigterm")
    await events.wait(lambda log: "started" in log.kinds_of("running-at-sigterm"), timeout_s=20, what="the long task's start")
    await client.submit("sleep", {"seconds": 0.1}, id="prefetched-at-sigterm")

    async def ack_pending() -> int:
        return (await bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer("default", "medium", "sleep"))).num_ack_pending

    with anyio.fail_after(10):
        while await ack_pending() != 2:  # one running, one waiting in the worker for the slot
            await anyio.sleep(0.02)

    draining.send_signal(signal.SIGTERM)
    assert await wait_exit(draining, timeout_s=settings.grace_s + 5) == 0, processes.logs()
    for task_id in ("running-at-sigterm", "prefetched-at-sigterm"):
        final = await events.wait_final(task_id, timeout_s=5)
        assert ev.kind(final) == "succeeded" and final.attempt == 1, final
        assert [e.worker for e in events.of_task(task_id) if ev.kind(e) == "started"] == [worker_id(draining)]
    assert await ack_pending() == 0


async def test_roles_reconnect_by_themselves_when_nats_server_restarts_while_workers_are_idle(
    bus, client: Client, restartable_server: RestartableServer, processes: Processes
):
    processes.schedulers()
    processes.worker("worker", concurrency=4)
    await client.submit("echo", {"n": -1}, id="before-restart")
    before = await final_states(client, ["before-restart"], timeout_s=30, processes=processes)
    assert before["before-restart"].status is Status.SUCCEEDED

    await restartable_server.restart(bus)
    task_ids = [f"after-restart-{n}" for n in range(20)]
    for n, task_id in enumerate(task_ids):
        await submit(client, "echo", {"n": n}, id=task_id)

    states = await final_states(client, task_ids, timeout_s=30, processes=processes)
    assert {s.status for s in states.values()} == {Status.SUCCEEDED}
    assert [msgspec.json.decode(states[t].result) for t in task_ids] == [{"n": n} for n in range(20)]
    assert sorted(processes.alive()) == ["master", "projector", "regional", "worker"]


async def test_no_task_is_lost_when_nats_server_restarts_while_workers_are_busy(
    bus, events: EventLog, client: Client, restartable_server: RestartableServer, processes: Processes
):
    rng = random.Random(4)
    task_ids = [f"busy-{n:03d}" for n in range(200)]
    concurrency = prefetch = finish_window = 4
    processes.schedulers()
    processes.env["STREAMSCHED_WORKER_FINISH_WINDOW"] = str(finish_window)
    processes.worker("worker", concurrency=concurrency, prefetch=prefetch)
    for task_id in task_ids:
        await client.submit("sleep", {"seconds": round(rng.uniform(0.01, 0.05), 3)}, id=task_id)

    await events.wait_count("succeeded", 30, timeout_s=30)
    await restartable_server.restart(bus)
    done_before_restart = len(await event_counts(bus, "succeeded"))
    assert done_before_restart < len(task_ids), "the work was done before the restart: nothing was tested"

    # The live log may have missed events while it was disconnected: read KV and EVENTS.
    states = await final_states(client, task_ids, timeout_s=60, processes=processes)
    assert {s.status for s in states.values()} == {Status.SUCCEEDED}
    succeeded = await event_counts(bus, "succeeded")
    assert sorted(succeeded) == task_ids
    for stream in (subjects.SCHED_STREAM, subjects.WORK_STREAM):
        await wait_drained(bus, stream, timeout_s=30)

    # A task runs again only when the server lost its ack: the worker held it un-acked when
    # the server stopped (running, waiting for a slot, or its outcome stored and its ack
    # not), and the server redelivers it. Upstream hops cannot add runs (their WORK and
    # SCHED publishes carry msg ids inside the dedupe window). A worker holds at most
    # concurrency + prefetch + finish_window tasks un-acked, so one restart reruns at most
    # that many, each once.
    held = concurrency + prefetch + finish_window
    started = await event_counts(bus, "started")
    rerun = {task_id: count for task_id, count in started.items() if count > 1}
    assert len(rerun) <= held and set(rerun.values()) <= {2}, rerun
    assert sum(succeeded.values()) - len(task_ids) <= held, {t: n for t, n in succeeded.items() if n > 1}
    assert sorted(processes.alive()) == ["master", "projector", "regional", "worker"]
