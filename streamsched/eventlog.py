"""Reading the event log: ``events tail`` and ``task history``.

EVENTS is read with an ephemeral, unacknowledged pull consumer that starts at a time or a
stream sequence. A message holds the events of many tasks (see :mod:`streamsched.recorder`),
so task, kind and type are filtered here, after decoding. Without ``follow`` a read stops
at the last event that existed when it began. A corrupt event, or one of a schema version
this code does not know, is skipped, counted and logged with its sequence.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import events as ev
from . import subjects
from .bus import Bus, stored_at_ns
from .state import StateStore

log = logging.getLogger("streamsched.eventlog")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Since:
    """Where a read starts: a stream sequence, or a wall-clock time."""

    seq: int | None = None
    time: datetime | None = None

    @classmethod
    def parse(cls, text: str | None) -> Since:
        """``10m`` / ``2h`` / ``1d`` ago, a stream sequence (``1234``) or an RFC 3339 time."""
        if not text:
            return cls(seq=1)
        if text.isdigit():
            return cls(seq=int(text))
        match = _DURATION.fullmatch(text)
        if match:
            seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
            return cls(time=datetime.fromtimestamp(time.time() - seconds, timezone.utc))
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--since {text!r}: expected a duration (10m, 2h, 1d), a sequence or an RFC 3339 time") from None
        return cls(time=moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc))


@dataclass(frozen=True)
class Record:
    """One event as read back: the event, its stream sequence and when it was stored."""

    seq: int
    stored_at: float
    event: ev.Event

    @property
    def kind(self) -> str:
        return ev.kind(self.event)


@dataclass(frozen=True)
class Stored:
    """A message as read back from a stream."""

    seq: int
    stored_ns: int
    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0


async def read(
    bus: Bus,
    stream: str,
    subject: str,
    since: Since,
    *,
    follow: bool = False,
    stats: ReadStats | None = None,
    batch: int = 1000,
) -> AsyncIterator[Stored]:
    """Every message on ``subject`` from ``since`` (up to the last one at the start, unless ``follow``)."""
    stats = stats if stats is not None else ReadStats()
    info = await bus.js.stream_info(stream)
    end_seq = info.state.last_seq
    if not follow and (info.state.messages == 0 or (since.seq is not None and since.seq > end_seq)):
        return
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True, max_ack_pending=-1)
    if since.time is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = since.time.isoformat().replace("+00:00", "Z")
    else:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(1, since.seq or 1)
    psub = await bus.js.pull_subscribe(subject, durable=None, stream=stream, config=config)
    try:
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except (asyncio.TimeoutError, TimeoutError):
                if follow:
                    continue
                # Nothing more matches up to the end we saw at the start.
                pending = (await psub.consumer_info()).num_pending
                if pending == 0:
                    return
                continue
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if not follow and seq > end_seq:
                    return
                stats.read += 1
                yield Stored(seq, stored_at_ns(msg.reply), msg.subject, msg.data or b"", dict(msg.headers or {}))
            if not follow and msgs and msgs[-1].metadata.sequence.stream >= end_seq:
                return
    finally:
        try:
            await psub.unsubscribe()
        except Exception:  # noqa: BLE001 - the ephemeral consumer expires on its own
            pass


def decode(seq: int, data: bytes, stats: ReadStats) -> list[ev.Event]:
    """The events of one message; none (counted, logged with its sequence) if it cannot be trusted."""
    try:
        events = ev.decode_all(data)
    except msgspec.DecodeError as exc:
        stats.skipped += 1
        log.warning("skipping undecodable event at EVENTS seq %d: %s", seq, exc)
        return []
    for event in events:
        if event.v > ev.SCHEMA_VERSION:
            stats.skipped += 1
            log.warning("skipping event of unknown schema version %d at EVENTS seq %d", event.v, seq)
            return []
    return events


async def tail(
    bus: Bus,
    *,
    task_id: str | None = None,
    kind: str | None = None,
    task_type: str | None = None,
    since: Since | None = None,
    follow: bool = False,
    stats: ReadStats | None = None,
) -> AsyncIterator[Record]:
    """Events matching the filters, oldest first."""
    stats = stats if stats is not None else ReadStats()
    types = _TypeLookup(bus) if task_type else None
    async for stored in read(bus, subjects.EVENTS_STREAM, subjects.EVENTS_ALL, since or Since(seq=1), follow=follow, stats=stats):
        for event in decode(stored.seq, stored.data, stats):
            if task_id is not None and event.task_id != task_id:
                continue
            if kind is not None and ev.kind(event) != kind:
                continue
            if types is not None and await types.type_of(event) != task_type:
                continue
            yield Record(stored.seq, stored.stored_ns / 1e9, event)


class _TypeLookup:
    """A task's type, from its ``submitted`` event if seen, else from KV (cached)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.known: dict[str, str | None] = {}
        self.store: StateStore | None = None

    async def type_of(self, event: ev.Event) -> str | None:
        if isinstance(event, ev.Submitted):
            self.known[event.task_id] = event.type
        if event.task_id not in self.known:
            self.store = self.store or await StateStore.open(self.bus)
            found = await self.store.get(event.task_id)
            self.known[event.task_id] = found[0].type if found else None
        return self.known[event.task_id]


#: How far before a task's submission its history is searched for (clocks of the
#: processes that recorded its events may differ a little from the server's).
HISTORY_MARGIN_S = 60.0


async def history(bus: Bus, task_id: str) -> list[Record]:
    """Every step of one task, in stream order, each once.

    The read starts a little before the task was submitted, when its state says so (else
    at the start of EVENTS). A step recorded twice (by a hop redelivered after a crash,
    or a submission repeated with the same id) is shown once, at its first record.
    """
    store = await StateStore.open(bus)
    found = await store.get(task_id)
    since = Since(seq=1)
    if found is not None and found[0].submitted_at:
        since = Since(time=datetime.fromtimestamp(found[0].submitted_at - HISTORY_MARGIN_S, timezone.utc))
    seen: set[tuple[str, int]] = set()
    records: list[Record] = []
    async for record in tail(bus, task_id=task_id, since=since):
        step = (record.kind, record.event.attempt)
        if record.kind not in ev.REPEATABLE:
            if step in seen:
                continue
            seen.add(step)
        records.append(record)
    return records


def format_record(record: Record, previous: Record | None = None) -> str:
    """One readable line; with ``previous``, the time since it (for task history)."""
    event = record.event
    when = datetime.fromtimestamp(event.at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [when, f"#{record.seq:<7}", f"{event.task_id:<26}", f"{record.kind:<13}"]
    if previous is not None:
        parts.append(f"+{1000 * (event.at - previous.event.at):9.1f} ms")
    if event.attempt:
        parts.append(f"attempt={event.attempt}")
    for field in ("type", "priority", "region", "worker", "delay_s", "duration_s", "reason", "error"):
        value = getattr(event, field, None)
        if value not in (None, "", 0.0):
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            parts.append(f"{field}={text[:200]}")
    if isinstance(event, ev.Succeeded) and event.result is not msgspec.UNSET:
        parts.append(f"result={bytes(event.result)[:200].decode(errors='replace')}")
    return "  ".join(parts)
