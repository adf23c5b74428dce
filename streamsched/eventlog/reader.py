"""Reading the event log: ``events tail`` and ``task history``.

EVENTS is read with an ephemeral, unacknowledged pull consumer that starts at a time or a
stream sequence. A message holds the events of many tasks (see :mod:`streamsched.eventlog.recorder`),
so task, kind and type are filtered here, after decoding. Without ``follow`` a read stops
at the last event that existed when it began. A corrupt event, or one of a schema version
this code does not know, is skipped, counted and logged with its sequence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
from nats.js.errors import NotFoundError

from .. import subjects
from ..transport.bus import Bus
from ..transport.reading import ReadStats, Since, read
from . import events as ev
from .state import MAX_EVENT_SEQS, StateStore

log = logging.getLogger("streamsched.eventlog")


@dataclass(frozen=True)
class Record:
    """One event as read back: the event, its stream sequence and when it was stored."""

    seq: int
    stored_at: float
    event: ev.Event

    @property
    def kind(self) -> str:
        return ev.kind(self.event)


def decode(seq: int, data: bytes, stats: ReadStats) -> list[ev.AnyEvent]:
    """The events of one message; none (counted, logged with its sequence) if it cannot be trusted."""
    try:
        events = ev.decode_all(data)
    except (msgspec.DecodeError, RecursionError) as exc:  # nested too deep for the decoder: as undecodable
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


#: How far back a task's history looks for events its state does not note yet (the projector
#: writes a running task's state at least every second).
UNPROJECTED_S = 5.0
#: How far before a task's submission its history is searched for (clocks of the
#: processes that recorded its events may differ a little from the server's).
HISTORY_MARGIN_S = 60.0


async def history(bus: Bus, task_id: str) -> list[Record]:
    """Every step of one task, in stream order, each once, as its state knows them.

    The state notes the EVENTS sequences of the messages that hold its events (up to
    :data:`~streamsched.eventlog.state.MAX_EVENT_SEQS`): those messages are read by
    sequence, so the cost follows the task's own events, not the stream's. For a task not
    yet final, the last :data:`UNPROJECTED_S` of EVENTS are read too, for events its state
    does not note yet (the projector writes a running task's state at least every second).
    A task with more messages is read from its first one on; a task without a state yet,
    from a minute ago. A step recorded twice (by a hop
    redelivered after a crash, or a submission repeated with the same id) is shown once,
    at its first record.
    """
    store = await StateStore.open(bus)
    found = await store.get(task_id)
    if found is not None and found[0].event_seqs and len(found[0].event_seqs) < MAX_EVENT_SEQS:
        # The messages that hold its events, read by sequence: as cheap for a day-old task as
        # for one a second old.
        state, noted = found[0], found[0].event_seqs
        records = await _read_messages(bus, task_id, noted)
        if not state.status.is_final:
            # Events the projector has not folded yet are at most a few seconds old.
            since = Since(time=datetime.fromtimestamp(time.time() - UNPROJECTED_S, UTC))
            records += [record async for record in tail(bus, task_id=task_id, since=since) if record.seq > noted[-1]]
        return _once_each(records)
    if found is not None and found[0].event_seqs:  # more messages than a state notes: read on from its first
        since = Since(seq=found[0].event_seqs[0])
    elif found is not None and found[0].submitted_at:  # a state written before states noted their messages
        since = Since(time=datetime.fromtimestamp(found[0].submitted_at - HISTORY_MARGIN_S, UTC))
    else:  # no state yet: a task submitted a moment ago, or none
        since = Since(time=datetime.fromtimestamp(time.time() - HISTORY_MARGIN_S, UTC))
    return _once_each([record async for record in tail(bus, task_id=task_id, since=since)])


async def _read_messages(bus: Bus, task_id: str, seqs: list[int]) -> list[Record]:
    """The task's events in the EVENTS messages at ``seqs`` (direct gets, all at once); a
    message gone (EVENTS keeps events for ``events_max_age_s``) is skipped."""
    stats = ReadStats()

    async def one(seq: int) -> list[Record]:
        try:
            stored = await bus.js.get_msg(subjects.EVENTS_STREAM, seq=seq, direct=True)
        except NotFoundError:
            return []
        stored_at = stored.time.timestamp() if stored.time else 0.0
        return [Record(seq, stored_at, event) for event in decode(seq, stored.data or b"", stats) if event.task_id == task_id]

    found = await asyncio.gather(*(one(seq) for seq in seqs))
    return [record for records in found for record in records]


def _once_each(records: list[Record]) -> list[Record]:
    """Records in stream order, a step recorded twice shown once (at its first record)."""
    seen: set[tuple[str, int]] = set()
    kept: list[Record] = []
    for record in sorted(records, key=lambda record: record.seq):
        step = (record.kind, record.event.attempt)
        if record.kind not in ev.REPEATABLE:
            if step in seen:
                continue
            seen.add(step)
        kept.append(record)
    return kept


def format_record(record: Record, previous: Record | None = None) -> str:
    """One readable line; with ``previous``, the time since it (for task history)."""
    event = record.event
    when = datetime.fromtimestamp(event.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    parts = [when, f"#{record.seq:<7}", f"{event.task_id:<26}", f"{record.kind:<13}"]
    if previous is not None:
        parts.append(f"+{1000 * (event.at - previous.event.at):9.1f} ms")
    if event.attempt:
        parts.append(f"attempt={event.attempt}")
    for field in ("type", "priority", "region", "worker", "delay_s", "duration_s", "fraction", "message", "reason", "error"):
        value = getattr(event, field, None)
        if value not in (None, "", 0.0):
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            parts.append(f"{field}={text[:200]}")
    if isinstance(event, ev.Succeeded) and event.result is not msgspec.UNSET:
        parts.append(f"result={bytes(event.result)[:200].decode(errors='replace')}")
    return "  ".join(parts)
