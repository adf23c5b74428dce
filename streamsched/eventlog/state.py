"""Task state: the fold of EVENTS into one :class:`TaskState` per task, kept in KV ``tasks``.

:func:`fold` is idempotent (the same event twice changes nothing) and order-insensitive
for the outcome: an event only moves ``status`` forward if it ranks above the last one
folded in (its rank, computed in :func:`fold`), while facts such as ``submitted_at``
are filled in whenever they arrive.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from nats.js.errors import APIError, KeyNotFoundError
from nats.js.kv import KeyValue

from .. import subjects
from ..model import Status, TaskState, encode, state_decoder
from ..transport import wire
from ..transport.bus import Bus
from ..transport.reading import Since, read
from . import events as ev

#: Header for compare-and-set writes to the KV stream.
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
#: Headers of a compare-and-set write, pre-encoded: it lands only if the key's last revision
#: is ``%d`` (0: only if the key does not exist).
COMPARE_AND_SET = b"NATS/1.0\r\n" + EXPECTED_LAST_SUBJECT_SEQ.encode() + b": %d\r\n\r\n"
#: JetStream error code of a failed ``Nats-Expected-Last-Subject-Sequence`` check.
WRONG_LAST_SEQUENCE = 10071


#: EVENTS sequences a task's state keeps at most (:attr:`~streamsched.model.TaskState.event_seqs`):
#: a task with more event messages (long progress reports, many retries) has its history read
#: from the first of them on.
MAX_EVENT_SEQS = 64


def note_messages(state: TaskState, seqs: Sequence[int]) -> None:
    """Add the EVENTS sequences of messages holding the task's events to its state, in order, once each."""
    noted = state.event_seqs
    for seq in seqs:
        if noted and seq <= noted[-1]:
            at = bisect.bisect_left(noted, seq)
            if at < len(noted) and noted[at] == seq:
                continue
            if len(noted) < MAX_EVENT_SEQS:
                noted.insert(at, seq)
        elif len(noted) < MAX_EVENT_SEQS:
            noted.append(seq)


def fold(state: TaskState | None, event: ev.Event) -> TaskState:
    """Apply ``event`` to ``state`` (which is updated in place when given) and return it."""
    if state is None:
        state = TaskState(id=event.task_id, status=event.status)
    # The event's rank grows along the task's life, so a late event never rolls state back.
    rank = event.attempt * 10 + event.order
    newer = rank > state.rank
    if newer:
        state.status = event.status
        state.rank = rank
        state.updated_at = event.at
    if event.attempt > state.attempts:
        state.attempts = event.attempt
    _FACTS[type(event)](state, event, newer)
    return state


# What each kind of event adds besides its status, looked up by type. The projector folds
# five events per task: through a chain of isinstance checks (and the rank from a function
# call) that took 4.2 µs per task, through this table 2.3.


def _submitted(state: TaskState, event: ev.Submitted, _newer: bool) -> None:
    state.type = event.type
    if state.priority_changed_at is None:
        state.priority = event.priority
    state.region = state.region or event.region
    state.labels = event.labels
    state.submitted_at = event.at


def _scheduled(state: TaskState, event: ev.Scheduled | ev.Dispatched | ev.Held, _newer: bool) -> None:
    state.region = event.region
    if state.priority_changed_at is None:
        state.priority = event.priority


def _dispatched(state: TaskState, event: ev.Dispatched | ev.Held, newer: bool) -> None:
    _scheduled(state, event, newer)
    state.scheduled_at = event.at
    if newer:
        state.waiting_reason = None  # admitted past its limits: it waits no more


def _held(state: TaskState, event: ev.Held, newer: bool) -> None:
    _scheduled(state, event, newer)
    if newer or state.scheduled_at is None:  # a dispatch folded first keeps its time
        state.scheduled_at = event.at
    if state.status is Status.WAITING:  # not a late one, folded after its admission
        state.waiting_reason = event.reason


def _started(state: TaskState, event: ev.Started, _newer: bool) -> None:
    if event.attempt >= state.attempts:  # of the newest attempt (fold counted it already)
        state.started_at = event.at
        state.worker = event.worker
    state.stranded = None  # it found a worker: whatever it waited for is over


def _stranded(state: TaskState, event: ev.Stranded, _newer: bool) -> None:
    if state.started_at is None:  # a note folded after the start (out of order) is over already
        state.stranded = event.reason


def _rerouted(state: TaskState, event: ev.Rerouted, _newer: bool) -> None:
    state.rerouted = event.reason


def _succeeded(state: TaskState, event: ev.Succeeded, _newer: bool) -> None:
    state.result = event.result
    state.error = None
    state.finished_at = event.at


def _failed(state: TaskState, event: ev.Failed | ev.Dead, _newer: bool) -> None:
    state.error = event.error
    state.finished_at = event.at


def _retrying(state: TaskState, event: ev.Retrying, newer: bool) -> None:
    if newer:
        state.error = event.error


def _rejected(state: TaskState, event: ev.Rejected, _newer: bool) -> None:
    if state.status is Status.REJECTED:
        state.error = event.reason
        state.finished_at = event.at


def _cancelled(state: TaskState, event: ev.Cancelled, newer: bool) -> None:
    if newer:  # a cancel that lost the race to an outcome leaves that outcome's facts alone
        state.error = event.reason or "cancelled"
        state.finished_at = event.at
        if event.result is not msgspec.UNSET:
            state.result = event.result


def _progress(state: TaskState, event: ev.Progress, _newer: bool) -> None:
    # Of the newest attempt (fold counted it already); a report with only a message keeps the fraction.
    if event.attempt >= state.attempts:
        if event.fraction is not None:
            state.progress = event.fraction
        if event.message:
            state.progress_message = event.message


def _reprioritized(state: TaskState, event: ev.Reprioritized, _newer: bool) -> None:
    # Not a step of the life: it changes the priority, never the status.
    if state.priority_changed_at is None or event.at >= state.priority_changed_at:
        state.priority = event.priority
        state.priority_changed_at = event.at


def _waiting(state: TaskState, event: ev.Waiting, _newer: bool) -> None:
    # Facts kept after the release too (what it waited for), whatever the order of arrival.
    if event.on:
        state.waiting_on = event.on
    if event.until is not None:
        state.not_before = event.until


_FACTS: dict[type, Callable[[TaskState, Any, bool], None]] = {
    ev.Submitted: _submitted,
    ev.Rejected: _rejected,
    ev.Waiting: _waiting,
    ev.Scheduled: _scheduled,
    ev.Stranded: _stranded,
    ev.Rerouted: _rerouted,
    ev.Dispatched: _dispatched,
    ev.Held: _held,
    ev.Started: _started,
    ev.Progress: _progress,
    ev.Retrying: _retrying,
    ev.Succeeded: _succeeded,
    ev.Failed: _failed,
    ev.Dead: _failed,
    ev.Cancelled: _cancelled,
    ev.Reprioritized: _reprioritized,
}
assert set(_FACTS) == set(ev.AnyEvent.__args__), "every kind of event needs its entry"


def is_final(state: TaskState) -> bool:
    """True once the task will not change again on its own."""
    return state.status.is_final


#: Keys one :meth:`StateStore.get_many` may ask for (the server refuses more than 1,024).
MAX_GET_MANY = 256


class StateStore:
    """Read access to KV ``tasks`` (the projector writes through :func:`put_subject`)."""

    def __init__(self, kv: KeyValue, bucket: str = subjects.STATE_BUCKET) -> None:
        self.kv = kv
        self.bucket = bucket

    @classmethod
    async def open(cls, bus: Bus, bucket: str = subjects.STATE_BUCKET) -> StateStore:
        return cls(await bus.js.key_value(bucket), bucket)

    def put_subject(self, task_id: str) -> str:
        """The KV stream subject of a task's state, for raw compare-and-set publishes."""
        return f"$KV.{self.bucket}.{subjects.state_key(task_id)}"

    async def all(self, bus: Bus) -> dict[str, TaskState]:
        """Every task's state (for comparisons and audits; reads the whole bucket).

        Read from the bucket's stream up to its last sequence, rather than with a KV
        watcher, whose "no more values" marker can come before the values.
        """
        prefix = f"$KV.{self.bucket}."
        out: dict[str, TaskState] = {}
        async for stored in read(bus, f"KV_{self.bucket}", prefix + ">", Since(seq=1)):
            key = stored.subject[len(prefix) :]
            if stored.headers.get("KV-Operation") in ("DEL", "PURGE") or not stored.data:
                out.pop(key, None)
            else:
                out[key] = state_decoder.decode(stored.data)
        return out

    async def get_many(self, bus: Bus, task_ids: Sequence[str], *, timeout_s: float = 10.0) -> dict[str, tuple[TaskState, int]]:
        """The states and revisions of several tasks with one request (a batched direct get
        of each key's last value, at most :data:`MAX_GET_MANY` keys); unknown ones are left out."""
        found: dict[str, tuple[TaskState, int]] = {}
        if not task_ids:
            return found
        task_of = {self.put_subject(task_id): task_id for task_id in task_ids}
        entries = await last_values(bus, f"KV_{self.bucket}", list(task_of), timeout_s=timeout_s)
        if entries is None:  # no responders: a bucket made elsewhere, without direct gets
            got = await asyncio.gather(*(self.get(task_id) for task_id in task_ids))
            return {task_id: entry for task_id, entry in zip(task_ids, got, strict=True) if entry is not None}
        for subject, revision, data in entries:
            task_id = task_of.get(subject)
            if task_id is not None and data:
                found[task_id] = (state_decoder.decode(data), revision)
        return found

    async def get(self, task_id: str) -> tuple[TaskState, int] | None:
        """The task's state and its KV revision, or ``None`` if unknown."""
        try:
            entry = await self.kv.get(subjects.state_key(task_id))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return state_decoder.decode(entry.value), entry.revision or 0


async def last_values(bus: Bus, stream: str, filters: list[str], *, timeout_s: float = 10.0) -> list[tuple[str, int, bytes]] | None:
    """``(subject, sequence, data)`` of the last message on each subject matching ``filters``
    (subjects, wildcards allowed), with one batched direct get of ``stream``; KV deletes and
    purges are left out. ``None`` when the stream answers no direct gets (made without them).

    At most 1,024 filters per call (the server's limit); the answer holds every match, however many.
    """
    found: list[tuple[str, int, bytes]] = []
    if not filters:
        return found
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_reply(_subject: str, _reply: str, data: bytes, raw_headers: bytes | None) -> None:
        headers = wire.parse_headers(raw_headers) if raw_headers else {}
        status = headers.get("Status")
        if status is not None:  # the end of the batch (204), none found (404), or an error
            if not done.done():
                if status in ("204", "404", "503"):
                    done.set_result(status)
                else:
                    done.set_exception(APIError(code=int(status), description=headers.get("Description", "")))
            return
        if headers.get("KV-Operation") not in ("DEL", "PURGE"):
            try:  # this runs in the connection's read loop: nothing may escape it
                found.append((headers.get("Nats-Subject", ""), int(headers["Nats-Sequence"]), data))
            except (KeyError, ValueError) as exc:
                if not done.done():
                    done.set_exception(exc)

    async with bus.reply_subject(on_reply) as inbox:
        bus.send(f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode({"multi_last": filters}), inbox)
        status = await asyncio.wait_for(done, timeout_s)
    return None if status == "503" else found


def encode_state(state: TaskState) -> bytes:
    return encode(state)
