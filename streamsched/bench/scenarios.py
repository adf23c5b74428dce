"""The benchmark scenarios. Each starts its own nats-server and returns a result dict."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.js.api import ConsumerInfo, StreamInfo

from .. import subjects
from ..eventlog import events as ev
from ..transport.bus import Bus
from ..transport.reading import Since, read
from .harness import (
    CpuMeter,
    Roles,
    envelope,
    finished_count,
    percentiles,
    projected_through,
    projector_caught_up,
    read_events,
    rss_mb,
    server_messages,
    submit,
    system,
    wait_until,
)

WARMUP = 500
#: Worker slots in ``priority`` unless ``--concurrency`` is given (see there).
PRIORITY_CONCURRENCY = 16
#: Lows ahead of the high task in ``priority``'s trial at the door, and how long each runs.
#: 16 slots run 160 of them a second: slow enough that the lows finished while the burst
#: itself is being published (about a second) stay well under 1 %, fast enough that a high
#: task waiting for the master to read the whole burst (20,000 at 8,000/s) would see more.
DOOR_LOWS = 20_000
DOOR_LOW_S = 0.1


async def _warm_up(bus: Any, prefix: str = "warm", roles: Roles | None = None) -> int:
    spread = roles or Roles()
    await submit(bus, (envelope(f"{prefix}{i}", region=spread.region_of(i)) for i in range(WARMUP)))
    await wait_until(lambda: _at_least(bus, WARMUP), timeout_s=120)
    return await finished_count(bus)


async def _at_least(bus: Any, count: int) -> bool:
    return await finished_count(bus) >= count


async def throughput(n: int = 50_000, roles: Roles | None = None) -> dict[str, Any]:
    """N no-op tasks submitted while the system consumes them (spread over the regions of
    ``roles`` in turn); end-to-end tasks/s and CPU."""
    roles = (roles or Roles()).resolved()
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles)
        base = await _warm_up(sys_.bus, roles=roles)
        meter = CpuMeter(sys_.role_pids()).start()
        messages_before = await server_messages(sys_.server)
        began = time.monotonic()
        submit_s = await submit(sys_.bus, (envelope(f"t{i}", region=roles.region_of(i)) for i in range(n)))
        done = await wait_until(lambda: _at_least(sys_.bus, base + n), timeout_s=600)
        projected = await wait_until(lambda: projector_caught_up(sys_.bus), timeout_s=600)
        cpu = meter.stop()
        messages_after = await server_messages(sys_.server)
        elapsed = done - began
        total = n + WARMUP
        messages = {name: (await sys_.bus.js.stream_info(name)).state.last_seq / total for name in ("TASKS", "SCHED", "WORK", "EVENTS", "KV_tasks")}
        return {
            "scenario": "throughput",
            "stream_messages_per_task": messages,
            # Every message a client sent or received (publishes, acks, pull requests, deliveries,
            # PubAcks, the bench's own polls): the server's and the clients' per-message work.
            "server_in_out_per_task": [(after - before) / n for before, after in zip(messages_before, messages_after, strict=True)],
            "n": n,
            "roles": vars(roles),
            "tasks_per_s": n / elapsed,
            "submit_per_s": n / submit_s,
            "projected_per_s": n / (projected - began),
            "cpu_percent": {k: 100 * v / elapsed for k, v in cpu.items()},
            "cpu_us_per_task": {k: 1e6 * v / n for k, v in cpu.items()},
            "cpu_us_per_task_total": 1e6 * sum(cpu.values()) / n,
        }


async def latency(rate: float = 250.0, n: int = 2000, roles: Roles | None = None) -> dict[str, Any]:
    """Tasks at a fixed rate; submit→started and submit→succeeded percentiles in ms."""
    roles = (roles or Roles()).resolved()
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles)
        base = await _warm_up(sys_.bus)
        sent_at: dict[str, float] = {}
        began = time.monotonic()
        for i in range(n):
            # Open loop: each task goes at its slot, whatever the previous ones did.
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task_id = f"l{i}"
            sent_at[task_id] = time.time()
            await sys_.bus.publish("tasks.submit", envelope(task_id))
        await wait_until(lambda: _at_least(sys_.bus, base + n), timeout_s=300)
        started = {e.task_id: e.at for e in await read_events(sys_.bus, "started", expected=base + n)}
        finished = {e.task_id: e.at for e in await read_events(sys_.bus, "succeeded", expected=base + n)}
        to_start = [1000 * (started[t] - s) for t, s in sent_at.items() if t in started]
        to_finish = [1000 * (finished[t] - s) for t, s in sent_at.items() if t in finished]
        return {
            "scenario": "latency",
            "rate_per_s": rate,
            "n": n,
            "submit_to_started_ms": percentiles(to_start),
            "submit_to_succeeded_ms": percentiles(to_finish),
        }


async def at_the_door(lows: int = DOOR_LOWS, low_s: float = DOOR_LOW_S, roles: Roles | None = None) -> dict[str, Any]:
    """A high task published on ``tasks.submit.high`` right after ``lows`` low ones on
    ``tasks.submit.low``, every role running: how many lows had finished when it started."""
    roles = (roles or Roles()).resolved(PRIORITY_CONCURRENCY)
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles)
        await _warm_up(sys_.bus)
        started: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def record(msg: Any) -> None:
            if b"door-high" in msg.data and not started.done():  # decode only the high's messages
                for event in ev.decode_all(msg.data):
                    if event.task_id == "door-high" and ev.kind(event) == "started":
                        started.set_result(event.at)

        sub = await sys_.bus.nc.subscribe(subjects.EVENTS_ALL, cb=record)
        await sys_.bus.nc.flush()
        bodies = (envelope(f"door-low{i}", "sleep", "low", {"seconds": low_s}) for i in range(lows))
        publish_s = await submit(sys_.bus, bodies, subject=subjects.submit("low"))
        sent = time.time()
        await (await sys_.bus.publish(subjects.submit("high"), envelope("door-high", "echo", "high")))
        async with asyncio.timeout(600):
            high_started = await started
        await sub.unsubscribe()
        await asyncio.sleep(1.0)  # the events of the lows that finished before it are recorded by now
        finished = [event.at for event in await _events_so_far(sys_.bus, "succeeded") if event.task_id.startswith("door-low")]
        done = sum(1 for at in finished if at <= high_started)
        return {
            "lows": lows,
            "low_task_ms": 1000 * low_s,
            "publish_s": publish_s,
            "high_wait_to_start_ms": 1000 * (high_started - sent),
            "lows_done_at_start": done,
            "lows_done_while_it_waited": done - sum(1 for at in finished if at <= sent),
            "share_done_at_start": done / lows,
        }


async def _events_so_far(bus: Bus, kind: str) -> list[ev.Event]:
    """Every event of ``kind`` in EVENTS up to its last message now."""
    found: list[ev.Event] = []
    async for stored in read(bus, subjects.EVENTS_STREAM, subjects.EVENTS_ALL, Since(seq=1)):
        found += (event for event in ev.decode_all(stored.data) if ev.kind(event) == kind)
    return found


async def priority(
    backlog: int = 100_000, trials: int = 20, low_s: float = 0.01, roles: Roles | None = None, door_lows: int = DOOR_LOWS
) -> dict[str, Any]:
    """First :func:`at_the_door` (its own server), then a queued backlog of low tasks
    (``low_s`` each) and high tasks one at a time."""
    door = await at_the_door(door_lows, roles=roles)
    # 16 slots run the lows at 1,600/s. With 64 the worker would run 6,400 lows/s, about all
    # the whole pipeline carries on two cores (no-op tasks with their events), and the figure
    # would measure CPU saturation, not how a high task passes a queue.
    roles = (roles or Roles()).resolved(PRIORITY_CONCURRENCY)
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles)
        await _warm_up(sys_.bus)
        await submit(sys_.bus, (envelope(f"low{i}", "sleep", "low", {"seconds": low_s}) for i in range(backlog)))
        # Measure how a high task passes a queue, not the aftermath of the burst that built it:
        # the whole backlog is routed first (ingress has its own target), and the view has
        # folded the burst's events. Until then the projector and the server's work for it
        # take both cores, and every hop of a high task waits for CPU (measured: 10-37 ms
        # outliers in the master, regional and worker alike; 1.6-11 ms once settled).
        queued = time.monotonic()
        await wait_until(lambda: _routed(sys_.bus), timeout_s=600, poll_s=0.2)
        burst_events = (await sys_.bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
        await wait_until(lambda: projected_through(sys_.bus, burst_events), timeout_s=600, poll_s=0.2)
        settle_s = time.monotonic() - queued
        waits: list[float] = []
        hops: dict[str, list[float]] = {"to_submitted": [], "to_dispatched": [], "to_started": []}
        for i in range(trials):
            task_id = f"high{i}"
            seen: dict[str, Any] = {}
            arrived = asyncio.Event()

            async def record(msg: Any, task_id: str = task_id, seen: dict[str, Any] = seen, arrived: asyncio.Event = arrived) -> None:
                seen.update((ev.kind(event), event) for event in ev.decode_all(msg.data) if event.task_id == task_id)
                arrived.set()

            # Pushed to the bench as they are stored (a core subscription), so measuring adds no polling load.
            sub = await sys_.bus.nc.subscribe(subjects.EVENTS_ALL, cb=record)
            await sys_.bus.nc.flush()
            sent = time.time()
            await (await sys_.bus.publish("tasks.submit", envelope(task_id, "echo", "high")))
            async with asyncio.timeout(60):
                while not {"submitted", "dispatched", "started"} <= seen.keys():  # in messages of three roles
                    await arrived.wait()
                    arrived.clear()
            await sub.unsubscribe()
            at = {kind: seen[kind].at for kind in ("submitted", "dispatched", "started")}
            waits.append(1000 * (at["started"] - sent))
            # Where the wait was spent: ingress (master), SCHED -> WORK (regional), WORK -> worker.
            hops["to_submitted"].append(1000 * (at["submitted"] - sent))
            hops["to_dispatched"].append(1000 * (at["dispatched"] - at["submitted"]))
            hops["to_started"].append(1000 * (at["started"] - at["dispatched"]))
        return {
            "scenario": "priority",
            "roles": vars(roles),
            "backlog": backlog,
            "low_task_ms": 1000 * low_s,
            "high_wait_to_start_ms": percentiles(waits),
            "hops_ms": {hop: percentiles(values) for hop, values in hops.items()},
            "target_ms": 1000 * low_s + 10,
            "settle_s": settle_s,
            "door": door,
        }


async def backlog(n: int = 1_000_000, roles: Roles | None = None, sample_s: float = 5.0) -> dict[str, Any]:
    """N tasks queued with no workers, then drained; RSS of every role over time, disk per task."""
    roles = (roles or Roles()).resolved()
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles, only=("master", "regional", "projector"))
        samples: list[dict[str, Any]] = []
        began = time.monotonic()

        async def sample() -> None:
            while True:
                samples.append({"t": round(time.monotonic() - began, 1), "rss_mb": rss_mb(sys_.role_pids())})
                await asyncio.sleep(sample_s)

        sampler = asyncio.get_running_loop().create_task(sample())
        try:
            chunk = 50_000
            for start in range(0, n, chunk):
                await submit(sys_.bus, (envelope(f"b{i}") for i in range(start, min(n, start + chunk))))
            queued = time.monotonic()
            await wait_until(lambda: _work_backlog_at_least(sys_.bus, n), timeout_s=1800, poll_s=1.0)
            routed = time.monotonic()
            disk = {name: (await sys_.bus.js.stream_info(name)).state.bytes for name in ("TASKS", "SCHED", "WORK", "EVENTS", "KV_tasks")}
            sys_.start_roles(roles, only=("worker",))
            drain_began = time.monotonic()
            await wait_until(lambda: _at_least(sys_.bus, n), timeout_s=1800, poll_s=1.0)
            drained = time.monotonic()
        finally:
            sampler.cancel()
        peak = {name: max(s["rss_mb"].get(name, 0.0) for s in samples) for name in samples[-1]["rss_mb"]}
        return {
            "scenario": "backlog",
            "n": n,
            "submit_s": queued - began,
            "routed_s": routed - began,
            "drain_per_s": n / (drained - drain_began),
            "disk_bytes_per_task": {k: v / n for k, v in disk.items()},
            "peak_rss_mb": peak,
            "rss_samples": samples,
        }


async def ingress(n: int = 200_000, roles: Roles | None = None) -> dict[str, Any]:
    """N raw submissions queued on TASKS first; then master, regional and projector start,
    and the master's drain rate is measured from its first ack to its last."""
    roles = (roles or Roles()).resolved()
    async with system(roles=roles) as sys_:
        await submit(sys_.bus, (envelope(f"i{i}") for i in range(n)))
        sys_.start_roles(roles, only=("master", "regional", "projector"))
        meter = CpuMeter(sys_.role_pids()).start()
        await wait_until(lambda: _master_acked_at_least(sys_.bus, 1), timeout_s=60, poll_s=0.01)
        first = time.monotonic()
        already = (await sys_.bus.js.consumer_info("TASKS", "master")).ack_floor.stream_seq
        await wait_until(lambda: _master_acked_at_least(sys_.bus, n), timeout_s=600, poll_s=0.05)
        drained = time.monotonic()
        cpu = meter.stop()
        return {
            "scenario": "ingress",
            "n": n,
            "master_drain_per_s": (n - already) / (drained - first),
            "cpu_us_per_task": {k: 1e6 * v / n for k, v in cpu.items()},
        }


async def _master_acked_at_least(bus: Bus, count: int) -> bool:
    master: ConsumerInfo = await bus.js.consumer_info("TASKS", "master")
    return master.ack_floor is not None and master.ack_floor.stream_seq >= count


async def _work_backlog_at_least(bus: Bus, count: int) -> bool:
    info: StreamInfo = await bus.js.stream_info("WORK")
    return info.state.messages >= count


async def _routed(bus: Bus) -> bool:
    master: ConsumerInfo = await bus.js.consumer_info("TASKS", "master")
    sched: StreamInfo = await bus.js.stream_info("SCHED")
    return master.num_pending == 0 and master.num_ack_pending == 0 and sched.state.messages == 0
