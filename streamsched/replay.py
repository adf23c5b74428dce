"""Replay tooling: rebuild the task-state projection from EVENTS, and replay submissions.

* :func:`rebuild_state` folds EVENTS from the first event into a KV bucket with a
  :class:`~streamsched.projector.Projector` reading its own temporary consumer. Into the
  live ``tasks`` bucket it pauses the live projector, purges the bucket, rebuilds, and
  resumes it (the live projector's cache is then stale; its compare-and-set writes notice
  and re-read). Into another bucket it builds a new version beside the live one.
* :func:`replay_submissions` copies the original submissions of a time window from TASKS
  to another deployment, rate-limited. Each copy carries the id the source gave the task,
  and the target's dedupe plus a check of its KV make a repeated or resumed replay skip
  what already arrived. Nothing runs again in the source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import anyio
import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import streams, subjects
from .bus import Bus
from .config import Settings
from .eventlog import ReadStats, Since, read
from .model import derive_task_id, envelope_decoder
from .projector import WINDOW, Projector
from .service import Role
from .state import StateStore

log = logging.getLogger("streamsched.replay")

Progress = Callable[[int], None]


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
            # Paused in short, renewed leases: if this command dies, the projector resumes by itself.
            await _pause_projector(bus)
            tg.start_soon(_keep_projector_paused, bus)
        try:
            return await _rebuild(bus, settings, bucket, timeout_s, began)
        finally:
            tg.cancel_scope.cancel()
            if live:
                with anyio.CancelScope(shield=True):
                    await js.resume_consumer(subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER)


#: How long one pause of the live projector lasts, and how often it is renewed.
PAUSE_LEASE_S = 30.0
PAUSE_RENEW_S = 10.0


async def _pause_projector(bus: Bus) -> None:
    await bus.js.pause_consumer(subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER, _rfc3339(time.time() + PAUSE_LEASE_S))


async def _keep_projector_paused(bus: Bus) -> None:
    while True:
        await anyio.sleep(PAUSE_RENEW_S)
        await _pause_projector(bus)


async def _rebuild(bus: Bus, settings: Settings, bucket: str, timeout_s: float, began: float) -> RebuildReport:
    """Recreate ``bucket`` and fold EVENTS into it through a temporary consumer."""
    js = bus.js
    config = streams.kv_config(settings)
    config.bucket = bucket
    try:
        await js.delete_stream(f"KV_{bucket}")
    except Exception:  # noqa: BLE001 - not there yet
        pass
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
            max_ack_pending=WINDOW,
        ),
    )
    projector = Projector(settings, bus, store, consumer=consumer)
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


@dataclass
class ReplayReport:
    selected: int = 0
    sent: int = 0
    already_there: int = 0
    skipped_invalid: int = 0
    ids: list[str] = field(default_factory=list)


async def replay_submissions(
    source: Bus,
    target: Bus | None,
    *,
    since: Since,
    until: datetime | None = None,
    task_type: str | None = None,
    rate_per_s: float | None = None,
    progress: Progress | None = None,
) -> ReplayReport:
    """Send the window's original submissions to ``target`` (``None``: dry run, count only)."""
    report = ReplayReport()
    target_store = await StateStore.open(target) if target is not None else None
    began = time.monotonic()
    stats = ReadStats()
    async for stored in read(source, subjects.TASKS_STREAM, subjects.SUBMIT, since, stats=stats):
        seq, stored_ns, data = stored.seq, stored.stored_ns, stored.data
        if until is not None and stored_ns / 1e9 > until.timestamp():
            break
        try:
            envelope = envelope_decoder.decode(data)
        except msgspec.DecodeError:
            report.skipped_invalid += 1  # it was rejected in the source too; nothing to replay
            continue
        if task_type is not None and envelope.type != task_type:
            continue
        # The id the source's master gave it, so the target dedupes a repeated replay.
        task_id = envelope.id or derive_task_id(stored_ns, seq)
        report.selected += 1
        if target is None:
            report.ids.append(task_id)
            continue
        assert target_store is not None
        if await target_store.get(task_id) is not None:
            report.already_there += 1
        else:
            body = data if envelope.id else msgspec.json.encode(msgspec.structs.replace(envelope, id=task_id))
            ack = await target.js.publish(subjects.SUBMIT, body, headers={subjects.H_MSG_ID: task_id})
            if ack.duplicate:  # sent by an earlier (interrupted) run, inside the dedupe window
                report.already_there += 1
            else:
                report.sent += 1
                report.ids.append(task_id)
        if progress is not None:
            progress(1)
        if rate_per_s:
            ahead = began + report.selected / rate_per_s - time.monotonic()
            if ahead > 0:
                await anyio.sleep(ahead)
    return report


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
