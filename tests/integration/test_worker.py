"""The worker against a real server: priority order, backpressure, retries, dead letters,
permanent failures, long tasks, duplicate submissions and per-attempt timeouts.

Master and regional scheduler run in-process too, so tasks arrive on WORK the way they do
in production; the projector runs where a test reads the KV state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import pytest
from nats.js.errors import NotFoundError

from streamsched import current_task, subjects, task
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog import events as ev
from streamsched.eventlog import reader as eventlog
from streamsched.eventlog.state import StateStore
from streamsched.model import Status, TaskState
from streamsched.roles.master import Master
from streamsched.roles.projector import Projector
from streamsched.roles.regional import Regional
from streamsched.roles.worker import NAK_NOW, Worker
from streamsched.testing import EventLog, running
from streamsched.transport import streams, wire
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

REGION = "default"


@task("test.flaky")
def flaky(payload: Any) -> dict[str, int]:
    """Fails its first two attempts, succeeds on the third."""
    attempt = current_task().attempt
    if attempt < 3:
        raise RuntimeError(f"flaky on attempt {attempt}")
    return {"attempt": attempt}


@task("test.nap")
async def nap(payload: dict[str, float]) -> None:
    """Sleeps on the event loop (the async counterpart of the example `sleep`)."""
    await anyio.sleep(payload["seconds"])


async def submit(bus: Bus, **fields: Any) -> bytes:
    """Publish a task as raw JSON to the ingress (stored before this returns); returns the bytes."""
    data = msgspec.json.encode(fields)
    await bus.js.publish(subjects.SUBMIT, data)
    return data


async def routing(settings: Settings, bus: Bus) -> list:
    """Everything upstream of the worker, plus the projector."""
    return [Master(settings, bus), Regional(settings, bus, REGION), Projector(settings, bus, await StateStore.open(bus))]


async def final_state(bus: Bus, task_id: str) -> TaskState:
    return await Client(bus, await StateStore.open(bus)).wait(task_id, timeout_s=10)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, what: str = "") -> None:
    """Poll ``check`` until it holds; fail after the deadline."""
    try:
        with anyio.fail_after(timeout_s):
            while not await check():
                await anyio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what or check}") from None


def of(events: EventLog, task_id: str, kind: str) -> list[ev.Event]:
    """The events of one kind of one task, in arrival order."""
    return [e for e in events.of_task(task_id) if ev.kind(e) == kind]


async def _ack_wait_is(bus: Bus, consumer: str, seconds: float) -> bool:
    try:
        return (await bus.js.consumer_info(subjects.WORK_STREAM, consumer)).config.ack_wait == seconds
    except NotFoundError:
        return False


async def work_consumers(bus: Bus, settings: Settings, task_type: str) -> list:
    """The WORK durables of ``task_type``, one per priority, once they exist (the first worker
    that loads the type makes them)."""
    found = []
    for priority in settings.priorities:
        with contextlib.suppress(NotFoundError):
            found.append(await bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(REGION, priority, task_type)))
    return found


async def test_high_priority_tasks_overtake_a_backlog_of_low_ones(settings, bus, events: EventLog, registry):
    lows = [f"low-{i}" for i in range(30)]
    highs = [f"high-{i}" for i in range(10)]
    async with running(await routing(settings, bus)):
        for ids, priority in ((lows, "low"), (highs, "high")):  # the lows are older
            for task_id in ids:
                await submit(bus, id=task_id, type="sleep", priority=priority, payload={"seconds": 0.01})

        async def all_waiting_on_work() -> bool:
            return (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == 40

        await eventually(all_waiting_on_work, what="40 tasks on WORK")
        assert not events.of_kind("started")

        worker = Worker(settings, bus, registry, region=REGION, concurrency=1)
        async with running([worker]):
            await events.wait_count("succeeded", 40, timeout_s=12)

    order = [e.task_id for e in events.of_kind("started")]
    assert sorted(order) == sorted(lows + highs)
    last_high = max(order.index(task_id) for task_id in highs)
    lows_before_last_high = [task_id for task_id in order[:last_high] if task_id.startswith("low")]
    # The puller gives lower levels a small share (one allocation in share_every=8), so a
    # low or two may run early; in submission order all 30 lows would come first.
    assert len(lows_before_last_high) <= 3, order
    # Within a level, the oldest runs first.
    assert [t for t in order if t.startswith("low")] == lows
    assert [t for t in order if t.startswith("high")] == highs


@task("test.counted_nap")
async def counted_nap(payload: dict[str, float]) -> None:
    """Sleeps on the event loop and counts how many of it run at once (``RUNNING``)."""
    RUNNING["now"] += 1
    RUNNING["peak"] = max(RUNNING["peak"], RUNNING["now"])
    try:
        await anyio.sleep(payload["seconds"])
    finally:
        RUNNING["now"] -= 1


RUNNING = {"now": 0, "peak": 0}


async def test_a_worker_runs_at_most_concurrency_handlers_and_holds_at_most_its_finish_window_more(
    settings,
    bus,
    events: EventLog,
    registry,
):
    settings = msgspec.structs.replace(settings, worker_finish_window=1)
    RUNNING.update(now=0, peak=0)
    worker = Worker(settings, bus, registry, region=REGION, concurrency=2, prefetch=0)
    peak_ack_pending = peak_backlog = peak_held = 0
    async with running([*await routing(settings, bus), worker]):
        for i in range(8):
            await submit(bus, id=f"bp-{i}", type="test.counted_nap", priority=settings.priorities[i % 3], payload={"seconds": 0.3})
        over: list[list[tuple[str, int]]] = []
        with anyio.fail_after(12):
            while len(events.of_kind("succeeded")) < 8:
                consumers = await work_consumers(bus, settings, "test.counted_nap")
                ack_pending = sum(c.num_ack_pending for c in consumers)
                # Two running and one outcome on its way: 3. The consumers are read one after
                # another, so a task that ends between two reads and its successor can both be
                # counted once; a real excess lasts as long as a task runs (0.3 s), so it shows
                # in two reads in a row.
                over = [*over, [(c.name, c.num_ack_pending) for c in consumers]] if ack_pending > 3 else []
                assert len(over) < 2, over
                assert worker.puller.held <= 2
                peak_ack_pending = max(peak_ack_pending, ack_pending)
                peak_held = max(peak_held, worker.puller.held)
                peak_backlog = max(peak_backlog, sum(c.num_pending for c in consumers))
                await anyio.sleep(0.02)
    # The worker was saturated, so the bound was tested.
    assert RUNNING["peak"] == 2
    assert peak_ack_pending >= 2
    assert peak_held == 2
    assert peak_backlog >= 4  # meanwhile the rest waited in the WORK stream, not in the worker


async def test_a_handler_slot_is_free_while_its_outcome_is_on_its_way_up_to_the_finish_window(
    settings,
    bus,
    events: EventLog,
    registry,
    monkeypatch,
):
    """Outcomes that have not landed hold no handler slot, but at most ``worker_finish_window``
    of them are in flight: past that the worker takes no new task until one lands."""
    settings = msgspec.structs.replace(settings, worker_finish_window=3)
    worker = Worker(settings, bus, registry, region=REGION, concurrency=2, prefetch=0)
    held: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []
    forward = worker.settler.forward
    # The outcomes are kept from landing: the test lets them go when it has looked.
    monkeypatch.setattr(worker.settler, "forward", lambda msg, *args, **kwargs: held.append((msg, args, kwargs)))

    async def five_held() -> bool:
        return len(held) == 5

    async with running([*await routing(settings, bus), worker]):
        for i in range(10):
            await submit(bus, id=f"fw-{i}", type="echo", payload=i)
        # Two slots and three outcomes on their way: five tasks ran, none of them landed.
        await eventually(five_held, what="five outcomes held")
        assert worker.finishing == 5
        assert worker.puller.free <= 0  # no credit: nothing more is asked for
        consumers = await work_consumers(bus, settings, "echo")
        assert sum(c.num_ack_pending for c in consumers) == 5
        assert not events.of_kind("succeeded")
        # Let them land: the waiting slots come back and the other five run.
        monkeypatch.setattr(worker.settler, "forward", forward)
        for msg, args, kwargs in held:
            forward(msg, *args, **kwargs)
        await events.wait_count("succeeded", 10, timeout_s=10)
    assert worker.finishing == 0
    assert sorted(e.task_id for e in events.of_kind("succeeded")) == sorted(f"fw-{i}" for i in range(10))


def msg_id(msg: Any) -> str | None:
    return wire.header_value(msg.raw_headers or b"", subjects.H_TASK_ID)


async def test_prefetched_tasks_wait_for_a_slot_kept_alive_and_start_highest_priority_first(
    settings,
    bus,
    events: EventLog,
    registry,
):
    """With one slot and a prefetch of two, the worker holds up to three tasks: one runs,
    the others wait here (heartbeated, so not redelivered though they wait past ack_wait),
    and the high one starts first when the slot frees."""
    worker = Worker(settings, bus, registry, region=REGION, concurrency=1, prefetch=2)
    long_s = settings.ack_wait_s * 1.5  # the waiting ones wait longer than ack_wait
    async with running(await routing(settings, bus)):
        await submit(bus, id="pf-first", type="test.nap", priority="low", payload={"seconds": long_s})
        async with running([worker]):
            await events.wait(lambda log: "started" in log.kinds_of("pf-first"), what="the first task started")
            await submit(bus, id="pf-low", type="echo", priority="low", payload=1)
            await submit(bus, id="pf-high", type="echo", priority="high", payload=2)

            async def high_waiting() -> bool:
                return "pf-high" in [msg_id(m) for m in worker._waiting[0]]

            await eventually(high_waiting, what="the high task waiting here for the slot")
            assert worker.puller.held <= 3
            await events.wait_count("succeeded", 3, timeout_s=long_s + 10)
    order = [e.task_id for e in events.of_kind("started")]
    assert order == ["pf-first", "pf-high", "pf-low"]
    # Each ran once, on its first delivery: waiting past ack_wait did not bring it back.
    assert [e.attempt for e in events.of_kind("started")] == [1, 1, 1]
    assert len(events.of_kind("succeeded")) == 3


GATE: dict[str, anyio.Event] = {}


@task("test.gated")
async def gated(payload: Any) -> None:
    """Returns when the test opens ``GATE["open"]``: every such handler at once."""
    await GATE["open"].wait()


@task("test.deep_result")
def deep_result(payload: Any) -> Any:
    """Returns a result nested 2,000 deep: more than the JSON encoder can take."""
    result: Any = []
    for _ in range(2000):
        result = [result]
    return result


@task("test.raises_cancelled")
async def raises_cancelled(payload: Any) -> None:
    """Raises CancelledError itself, as a handler does whose awaited inner task was cancelled."""
    raise asyncio.CancelledError


async def test_a_drain_runs_the_waiting_task_that_starts_as_two_handlers_end_together(settings, bus, events: EventLog, registry, monkeypatch):
    """The task started by the first slot to free is not yet 'running' when the second slot
    frees in the same loop tick: the drain must still wait for it, not cancel it."""
    settings = msgspec.structs.replace(settings, grace_s=10.0)
    worker = Worker(settings, bus, registry, region=REGION, concurrency=2, prefetch=1)
    replies: list[bytes] = []
    settle = worker.settler.settle
    monkeypatch.setattr(worker.settler, "settle", lambda msg, reply: (replies.append(reply), settle(msg, reply)))
    GATE["open"] = anyio.Event()
    async with running(await routing(settings, bus)):
        for i in range(3):
            await submit(bus, id=f"gate-{i}", type="test.gated", priority="high")
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)

            async def two_running_one_waiting() -> bool:
                return len(worker.running) == 2 and sum(map(len, worker._waiting)) == 1

            await eventually(two_running_one_waiting, what="two running and one waiting")
            await worker.shutdown()
            GATE["open"].set()  # both running handlers return in the same tick
        await events.wait_count("succeeded", 3)
    assert worker.counts["succeeded"] == 3
    assert NAK_NOW not in replies


async def test_a_result_the_encoder_cannot_take_fails_the_task_and_frees_its_slot(settings, bus, events: EventLog, registry):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=1, prefetch=0)
    async with running([*await routing(settings, bus), worker]):
        await submit(bus, id="deep", type="test.deep_result")
        await submit(bus, id="after-deep", type="echo", payload=1)
        assert ev.kind(await events.wait_final("deep")) == "failed"
        assert ev.kind(await events.wait_final("after-deep")) == "succeeded"
    assert "not JSON-serialisable" in of(events, "deep", "failed")[0].error  # type: ignore[attr-defined]


async def test_a_handler_raising_cancelled_error_is_retried_like_any_error(settings, bus, events: EventLog, registry):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=1, prefetch=0)
    async with running([*await routing(settings, bus), worker]):
        await submit(bus, id="cancelled", type="test.raises_cancelled", max_attempts=2)
        await submit(bus, id="after-cancelled", type="echo", payload=1)
        assert ev.kind(await events.wait_final("cancelled")) == "dead"
        assert ev.kind(await events.wait_final("after-cancelled")) == "succeeded"
    assert len(of(events, "cancelled", "retrying")) == 1


async def test_a_task_that_fails_twice_is_retried_and_succeeds_on_its_third_attempt(settings, bus, events: EventLog, registry):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=4)
    async with running([*await routing(settings, bus), worker]):
        await submit(bus, id="flaky-1", type="test.flaky")
        final = await events.wait_final("flaky-1")
        state = await final_state(bus, "flaky-1")

    assert events.kinds_of("flaky-1") == [
        "submitted",
        "scheduled",
        "dispatched",
        "started",
        "retrying",
        "started",
        "retrying",
        "started",
        "succeeded",
    ]
    retrying = of(events, "flaky-1", "retrying")
    assert [e.attempt for e in retrying] == [1, 2]
    assert [e.error for e in retrying] == ["RuntimeError: flaky on attempt 1", "RuntimeError: flaky on attempt 2"]
    assert all(e.delay_s > 0 for e in retrying)
    assert [e.attempt for e in of(events, "flaky-1", "started")] == [1, 2, 3]
    assert final.attempt == 3
    assert msgspec.json.decode(final.result) == {"attempt": 3}
    assert (state.status, state.attempts, state.error) == (Status.SUCCEEDED, 3, None)
    assert msgspec.json.decode(state.result) == {"attempt": 3}


async def test_a_task_that_keeps_failing_is_dead_lettered_after_max_attempts(settings, bus, events: EventLog, registry):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=4)
    async with running([*await routing(settings, bus), worker]):
        original = await submit(bus, id="doomed", type="fail", payload={"n": 1}, max_attempts=2)
        final = await events.wait_final("doomed")
        state = await final_state(bus, "doomed")

        async def gone_from_work() -> bool:
            return (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == 0

        await eventually(gone_from_work, what="the dead task termed off WORK")

    error = "RuntimeError: fail always fails (payload {'n': 1})"
    assert events.kinds_of("doomed")[-4:] == ["started", "retrying", "started", "dead"]
    assert (final.attempt, final.error) == (2, error)
    dlq = await bus.js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq("doomed"))
    assert dlq.data == original
    assert dlq.headers[subjects.H_ERROR] == error
    assert dlq.headers[subjects.H_ATTEMPTS] == "2"
    assert dlq.headers[subjects.H_TYPE] == "fail"
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 1
    assert (state.status, state.attempts, state.error) == (Status.DEAD, 2, error)


async def test_a_permanent_failure_is_not_retried(settings, bus, events: EventLog, registry):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=4)
    async with running([*await routing(settings, bus), worker]):
        await submit(bus, id="refused", type="fail_permanent", payload="x", max_attempts=5)
        final = await events.wait_final("refused")
        state = await final_state(bus, "refused")

    assert events.kinds_of("refused") == ["submitted", "scheduled", "dispatched", "started", "failed"]
    assert final.attempt == 1
    assert "fail_permanent refuses payload 'x'" in final.error
    assert (state.status, state.attempts) == (Status.FAILED, 1)
    assert "fail_permanent refuses" in state.error
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 0  # failed is not dead


async def test_a_task_running_three_times_longer_than_ack_wait_completes_exactly_once(settings, bus, events: EventLog, registry):
    short = msgspec.structs.replace(settings, ack_wait_s=1.0)
    await streams.apply(bus, short)
    consumer = subjects.work_consumer(REGION, "medium", "sleep")
    # Concurrency 4 keeps pull requests open, so a redelivery would be taken and started again.
    worker = Worker(short, bus, registry, region=REGION, concurrency=4)
    most_redelivered = 0
    async with running([*await routing(short, bus), worker]):
        # The worker made its durables with its own ack_wait.
        await eventually(lambda: _ack_wait_is(bus, consumer, 1.0), what="the worker's durable with ack_wait 1 s")
        await submit(bus, id="long", type="sleep", payload={"seconds": 3.5})
        with anyio.fail_after(10):
            while "succeeded" not in events.kinds_of("long"):
                info = await bus.js.consumer_info(subjects.WORK_STREAM, consumer)
                most_redelivered = max(most_redelivered, info.num_redelivered)
                await anyio.sleep(0.1)
        info = await bus.js.consumer_info(subjects.WORK_STREAM, consumer)

    kinds = events.kinds_of("long")
    assert (kinds.count("started"), kinds.count("succeeded")) == (1, 1), kinds
    assert most_redelivered == 0
    assert (info.num_redelivered, info.delivered.consumer_seq, info.num_ack_pending) == (0, 1, 0)


async def test_a_long_task_is_recorded_as_started_while_it_runs(settings, bus, events: EventLog, registry):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=1)
    async with running([*await routing(settings, bus), worker]):
        await submit(bus, id="slow", type="test.nap", payload={"seconds": 1.5})
        # Quick tasks send `started` with their outcome; a long one must not wait for it.
        await events.wait(lambda log: "started" in log.kinds_of("slow"), timeout_s=5, what="started of the running task")
        assert "succeeded" not in events.kinds_of("slow")
        started_at = events.of_task("slow")[-1].at
        final = await events.wait_final("slow", timeout_s=10)
    assert ev.kind(final) == "succeeded" and final.duration_s >= 1.4
    assert final.at - started_at >= 1.4  # `at` is the start, not when it was announced
    # Recorded on its own, then the outcome in a later message.
    stored = await eventlog.history(bus, "slow")
    assert [r.kind for r in stored] == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
    assert stored[3].seq < stored[4].seq


async def test_the_same_id_submitted_twice_runs_once(settings, bus, events: EventLog, registry):
    # One slot, one priority: a second copy of the task would run before the sentinel.
    worker = Worker(settings, bus, registry, region=REGION, concurrency=1)
    async with running([*await routing(settings, bus), worker]):
        body = b'{"id":"twice","type":"echo","payload":1}'
        await bus.nc.publish(subjects.SUBMIT, body)
        await bus.nc.publish(subjects.SUBMIT, body)
        await bus.nc.publish(subjects.SUBMIT, b'{"id":"sentinel","type":"echo","payload":2}')
        await events.wait_final("twice")
        await events.wait_final("sentinel")

    tasks = await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=subjects.SUBMIT)
    assert tasks.state.subjects == {subjects.SUBMIT: 3}  # both copies reached the master
    kinds = events.kinds_of("twice")
    assert (kinds.count("started"), kinds.count("succeeded")) == (1, 1), kinds
    # The master recorded the second copy's steps again (in another message); history shows each once.
    assert events.kinds_of("twice").count("submitted") == 2
    stored = await eventlog.history(bus, "twice")
    assert [r.kind for r in stored] == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
    # The master's two steps share a message, and so do a quick task's start and its outcome.
    assert stored[0].seq == stored[1].seq and stored[3].seq == stored[4].seq


@pytest.mark.parametrize("handler", ["sleep", "test.nap"], ids=["sync", "async"])
async def test_an_attempt_that_runs_past_its_timeout_is_retried_then_dead(settings, bus, events: EventLog, registry, handler):
    worker = Worker(settings, bus, registry, region=REGION, concurrency=2)
    async with running([*await routing(settings, bus), worker]):
        await submit(bus, id="slow", type=handler, payload={"seconds": 5}, timeout_s=0.2, max_attempts=2)
        with anyio.fail_after(4):  # well before the 5 s the handler would take
            final = await events.wait_final("slow")

    assert events.kinds_of("slow")[-4:] == ["started", "retrying", "started", "dead"]
    [retrying] = events.of_kind("retrying")
    assert retrying.attempt == 1
    assert "timed out after 0.2s" in retrying.error
    assert final.attempt == 2
    assert "timed out after 0.2s" in final.error


@task("test.huge")
def huge(payload: int) -> str:
    """Returns a result of ``payload`` bytes."""
    return "x" * payload


async def test_a_result_over_the_size_limit_fails_the_task_instead_of_blocking_the_projection(settings, bus, events: EventLog, registry):
    small = msgspec.structs.replace(settings, max_payload_bytes=2048)
    worker = Worker(small, bus, registry, region=REGION, concurrency=2)
    async with running([*await routing(small, bus), worker]):
        await submit(bus, id="big", type="test.huge", payload=10_000)
        await submit(bus, id="fits", type="test.huge", payload=100)
        big = await events.wait_final("big")
        assert ev.kind(big) == "failed" and "over the limit of 2048" in big.error
        assert ev.kind(await events.wait_final("fits")) == "succeeded"
        assert (await final_state(bus, "big")).status is Status.FAILED
