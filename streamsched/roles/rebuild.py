"""Rebuilding the task-state view from EVENTS, and comparing two views.

:func:`rebuild_state` folds EVENTS from the first event into a KV bucket with a
:class:`~streamsched.roles.projector.Projector` reading its own temporary consumer. Into
the live ``tasks`` bucket it pauses the live projectors (every partition's durable),
purges the bucket, rebuilds, and resumes them (their caches are then stale; their
compare-and-set writes notice and re-read). Into another bucket it builds a new version beside the live one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from .. import subjects
from ..config import Settings
from ..eventlog.state import StateStore
from ..transport import streams
from ..transport.bus import Bus
from .projector import Projector
from .service import Role

log = logging.getLogger("streamsched.rebuild")


@dataclass
class RebuildReport:
    bucket: str
    events: int
    tasks: int
    skipped: int
    seconds: float


async def rebuild_state(bus: Bus, settings: Settings, *, bucket: str = subjects.STATE_BUCKET, timeout_s: float = 3600.0) -> RebuildReport:
    """Fold every event in EVENTS into ``bucket`` (wiped first); see the module docstring."""
    began = time.monotonic()
    js = bus.js
    live = bucket == subjects.STATE_BUCKET
    async with anyio.create_task_group() as tg:
        if live:
            # Paused in short, renewed leases: if this command dies, the projectors resume by themselves.
            paused = [info.name for info in await streams.projector_durables(bus)]
            await _pause(bus, paused)
            tg.start_soon(_keep_paused, bus, paused)
        try:
            report = await _rebuild(bus, settings, bucket, timeout_s, began)
        finally:
            tg.cancel_scope.cancel()
            if live:
                with anyio.CancelScope(shield=True):
                    for consumer in paused:
                        await js.resume_consumer(subjects.EVENTS_STREAM, consumer)
    return report


#: How long one pause of the live projectors lasts, and how often it is renewed.
PAUSE_LEASE_S = 30.0
PAUSE_RENEW_S = 10.0


async def _pause(bus: Bus, consumers: list[str]) -> None:
    """Pause the projector durables ``consumers`` (every partition's) for one lease."""
    until = _rfc3339(time.time() + PAUSE_LEASE_S)
    for consumer in consumers:
        await bus.js.pause_consumer(subjects.EVENTS_STREAM, consumer, until)


async def _keep_paused(bus: Bus, consumers: list[str]) -> None:
    while True:
        await anyio.sleep(PAUSE_RENEW_S)
        await _pause(bus, consumers)


async def _rebuild(bus: Bus, settings: Settings, bucket: str, timeout_s: float, began: float) -> RebuildReport:
    """Recreate ``bucket`` and fold EVENTS into it through a temporary consumer."""
    js = bus.js
    config = streams.kv_config(settings)
    config.bucket = bucket
    with contextlib.suppress(NotFoundError):  # not there yet
        await js.delete_stream(f"KV_{bucket}")
    await js.create_key_value(config)
    store = await StateStore.open(bus, bucket)
    consumer = f"rebuild-{bucket}-{int(time.time())}"
    await js.add_consumer(
        subjects.EVENTS_STREAM,
        ConsumerConfig(
            durable_name=consumer,
            filter_subject=subjects.EVENTS_ALL,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            inactive_threshold=300.0,
            max_ack_pending=streams.PROJECTOR_WINDOW,
        ),
    )
    projector = Projector(settings, bus, store, consumer=consumer, follow_up=False)
    try:
        await _run_until_caught_up(bus, projector, consumer, timeout_s)
    finally:
        await js.delete_consumer(subjects.EVENTS_STREAM, consumer)
    tasks = (await js.stream_info(f"KV_{bucket}")).state.messages
    return RebuildReport(bucket, projector.applied, tasks, projector.stats.skipped, time.monotonic() - began)


async def _run_until_caught_up(bus: Bus, role: Role, consumer: str, timeout_s: float) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(role.run)
        with anyio.fail_after(timeout_s):
            while True:
                info = await bus.js.consumer_info(subjects.EVENTS_STREAM, consumer)
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
                await anyio.sleep(0.1)
        await role.shutdown()


async def compare_states(bus: Bus, left: str, right: str) -> list[str]:
    """Differences between two state buckets, one line per task that differs."""
    a = await (await StateStore.open(bus, left)).all(bus)
    b = await (await StateStore.open(bus, right)).all(bus)
    out = []
    for task_id in sorted(a.keys() | b.keys()):
        x, y = a.get(task_id), b.get(task_id)
        if x is None or y is None or msgspec.json.encode(x) != msgspec.json.encode(y):
            out.append(f"{task_id}: {left}={_short(x)} {right}={_short(y)}")
    return out


def _short(state: object) -> str:
    return "missing" if state is None else msgspec.json.encode(state).decode()[:300]


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
