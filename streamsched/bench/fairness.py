"""``bench fairness``: a tenant's trickle under another tenant's flood.

Tenant A floods ``flood`` low tasks (``task_s`` each) while tenant B sends one low task a
second until the flood has run; B's wait is from its publish to its start. Run twice, each
on its own server: with ``fairness_key`` on every task (A's and B's lanes share the WORK
subject by their weights) and without (B's tasks queue behind the flood in arrival order),
so the figure is seen beside what it saves.

B's waits are also given for the tasks it sent once the flood was queued (the master had
read all of it and the regional scheduler had parked or released it): until then a task
of B's waits in TASKS behind the part of the flood the master has not read yet, in arrival
order, however the queue is shared after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
from nats.js.api import ConsumerInfo, StreamInfo

from .. import subjects
from ..eventlog import events as ev
from ..transport.bus import Bus
from .harness import Roles, finished_count, percentiles, submit, system, wait_until

#: Tasks in tenant A's flood, and how long each runs: 16 slots run them at about 3,000 a
#: second, so the flood lasts long enough for B's trickle to take a sample each second.
FLOOD = 50_000
TASK_S = 0.005
CONCURRENCY = 16
#: Seconds between B's tasks.
TRICKLE_EVERY_S = 1.0


def _body(task_id: str, tenant: str | None, task_s: float) -> bytes:
    task: dict[str, Any] = {"id": task_id, "type": "sleep", "priority": "low", "payload": {"seconds": task_s}}
    if tenant is not None:
        task["fairness_key"] = tenant
    return msgspec.json.encode(task)


async def fairness(flood: int = FLOOD, task_s: float = TASK_S, roles: Roles | None = None) -> dict[str, Any]:
    """B's wait to start with fairness keys and without (see the module)."""
    roles = (roles or Roles()).resolved(CONCURRENCY)
    fair = await _trickle_under_flood(flood, task_s, roles, keyed=True)
    plain = await _trickle_under_flood(flood, task_s, roles, keyed=False)
    return {"scenario": "fairness", "roles": vars(roles), "flood": flood, "task_ms": 1000 * task_s, "fair": fair, "plain": plain}


async def _trickle_under_flood(flood: int, task_s: float, roles: Roles, *, keyed: bool) -> dict[str, Any]:
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles)
        bus = sys_.bus
        await submit(bus, (_body(f"warm{i}", "warm" if keyed else None, 0.0) for i in range(200)))
        await wait_until(lambda: _finished(bus, 200), timeout_s=120)
        base = await finished_count(bus)
        started: dict[str, float] = {}

        async def record(msg: Any) -> None:
            if b"fair-b" in msg.data:  # decode only the messages with B's events
                started.update((e.task_id, e.at) for e in ev.decode_all(msg.data) if ev.kind(e) == "started" and e.task_id.startswith("fair-b"))

        sub = await bus.nc.subscribe(subjects.EVENTS_ALL, cb=record)
        await bus.nc.flush()
        sent: dict[str, float] = {}
        began, began_at = time.monotonic(), time.time()

        async def trickle() -> None:
            while True:
                task_id = f"fair-b{len(sent)}"
                sent[task_id] = time.time()
                await (await bus.publish(subjects.SUBMIT, _body(task_id, "tenant-b" if keyed else None, task_s)))
                await asyncio.sleep(TRICKLE_EVERY_S)

        trickling = asyncio.get_running_loop().create_task(trickle())
        try:
            publish_s = await submit(bus, (_body(f"fair-a{i}", "tenant-a" if keyed else None, task_s) for i in range(flood)))
            await wait_until(lambda: _queued(bus), timeout_s=600, poll_s=0.05)
            queued_at = time.time()
            await wait_until(lambda: _finished(bus, base + flood), timeout_s=1800, poll_s=0.2)
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickling
        flood_s = time.monotonic() - began
        await wait_until(lambda: _all_started(started, sent), timeout_s=120, poll_s=0.05)
        await sub.unsubscribe()
        waits = [1000 * (started[task_id] - at) for task_id, at in sent.items()]
        after = [1000 * (started[task_id] - at) for task_id, at in sent.items() if at >= queued_at]
        return {
            "flood_s": flood_s,
            "publish_s": publish_s,
            "queued_s": queued_at - began_at,
            "samples": len(waits),
            "b_wait_to_start_ms": percentiles(waits),
            "b_waits_ms": waits,
            "samples_once_queued": len(after),
            "b_wait_once_queued_ms": percentiles(after),
        }


async def _queued(bus: Bus) -> bool:
    """The master has read every submission and the regional schedulers every SCHED message (lanes aside)."""
    master: ConsumerInfo = await bus.js.consumer_info(subjects.TASKS_STREAM, subjects.MASTER_CONSUMER)
    sched: StreamInfo = await bus.js.stream_info(subjects.SCHED_STREAM, subjects_filter="sched.*.*")
    return master.num_pending == 0 and master.num_ack_pending == 0 and not sched.state.subjects


async def _finished(bus: Any, count: int) -> bool:
    return await finished_count(bus) >= count


async def _all_started(started: dict[str, float], sent: dict[str, float]) -> bool:
    return sent.keys() <= started.keys()
