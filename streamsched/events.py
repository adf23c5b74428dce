"""Lifecycle events: one tagged union, published on ``events.<task_id>.<kind>``.

A message holds one event, or a JSON array of consecutive events of one task that one
process recorded together (the master's ``submitted`` and ``scheduled``; a worker's
``started`` and the outcome of a task that ended quickly). Its subject names the last
event. Fewer messages per task is most of what a task costs (see docs/BENCHMARKS.md);
Temporal records an activity's start with its completion for the same reason.

EVENTS is the source of truth; the KV projection (:mod:`streamsched.state`) is a fold
of these records, and the replay tools read them back. Every event carries:

* ``v``: the schema version (absent on the wire means 1; later versions always write it);
* ``task_id``, ``attempt`` (0 before the first run), ``region`` and, for events a worker
  publishes, ``worker``;
* ``at``: when the fact happened (Unix seconds). When it was *published* is the stream's
  own timestamp of the message, so it is not repeated in the body;
* ``trace``: the W3C ``traceparent`` of the task's trace, when tracing is on.

Fields equal to their default are left out of the JSON to keep EVENTS small. Schema
evolution: add fields with defaults; a change that old readers would misread bumps
``SCHEMA_VERSION``; readers skip (and count) events of a version they do not know.
``streamsched schema events`` prints the JSON Schema (see docs/EVENTS.md).
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from . import subjects
from .model import MaybeRaw, Status

SCHEMA_VERSION = 1


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="kind", gc=False):
    """Fields every event has. ``rank`` orders the events of one task (see :func:`rank`).

    Untracked by the cyclic garbage collector (``gc=False``, as the structs of model.py): an
    event holds only JSON values, so it cannot be part of a reference cycle.
    """

    task_id: str
    at: float
    attempt: int = 0
    region: str = ""
    worker: str = ""
    trace: str = ""
    v: int = 1

    #: The status this event puts the task in.
    status: ClassVar[Status]
    #: Position of the event within one attempt; a final event outranks the rest.
    order: ClassVar[int]


class Submitted(Event, frozen=True, tag="submitted"):
    """The master accepted the submission and chose its region and priority."""

    type: str
    priority: str
    labels: dict[str, str] = {}
    status = Status.PENDING
    order = 1


class Rejected(Event, frozen=True, tag="rejected"):
    """The submission was invalid; ``original`` holds the bytes as they were sent.

    Ranked lowest: a bad resubmission under the id of an accepted task must not
    overwrite that task's state; it only decides the state of an id nothing else has.
    """

    reason: str
    original: bytes
    status = Status.REJECTED
    order = 0


class Waiting(Event, frozen=True, tag="waiting"):
    """Held back until ``until`` or until the tasks in ``on`` succeed (delays, dependencies)."""

    on: list[str] = []
    until: float | None = None
    status = Status.PENDING
    order = 1


class Scheduled(Event, frozen=True, tag="scheduled"):
    """The master placed the task on its region's SCHED subject."""

    priority: str
    status = Status.PENDING
    order = 2


class Dispatched(Event, frozen=True, tag="dispatched"):
    """The regional scheduler released the task onto WORK for workers to fetch."""

    priority: str
    status = Status.SCHEDULED
    order = 3


class Started(Event, frozen=True, tag="started"):
    """A worker began an attempt."""

    status = Status.RUNNING
    order = 4


class Progress(Event, frozen=True, tag="progress"):
    """A running handler reported progress (``fraction`` in 0..1 and/or a message)."""

    fraction: float | None = None
    message: str = ""
    status = Status.RUNNING
    order = 4


class Retrying(Event, frozen=True, tag="retrying"):
    """An attempt failed and the task comes back after ``delay_s``."""

    error: str
    delay_s: float
    status = Status.RETRYING
    order = 5


class Succeeded(Event, frozen=True, tag="succeeded"):
    result: MaybeRaw = msgspec.UNSET
    duration_s: float = 0.0
    status = Status.SUCCEEDED
    order = 9


class Failed(Event, frozen=True, tag="failed"):
    """Permanent failure: the handler said the task must not be retried."""

    error: str
    status = Status.FAILED
    order = 9


class Dead(Event, frozen=True, tag="dead"):
    """Attempts exhausted; the task is on the DLQ stream with its last error."""

    error: str
    status = Status.DEAD
    order = 9


class Cancelled(Event, frozen=True, tag="cancelled"):
    reason: str = ""
    status = Status.CANCELLED
    order = 9


class Reprioritized(Event, frozen=True, tag="reprioritized"):
    """The task's priority was changed while it waited."""

    priority: str
    previous: str = ""
    status = Status.PENDING
    order = 0


AnyEvent = (
    Submitted | Rejected | Waiting | Scheduled | Dispatched | Started | Progress | Retrying
    | Succeeded | Failed | Dead | Cancelled | Reprioritized
)

_KIND_OF: dict[type, str] = {cls: cls.__struct_config__.tag for cls in AnyEvent.__args__}  # type: ignore[attr-defined]
#: Kinds after which a task never changes again (the projector looks up each message's subject).
FINAL_KINDS: frozenset[str] = frozenset(tag for cls, tag in _KIND_OF.items() if cls.status.is_final)
KINDS: tuple[str, ...] = tuple(_KIND_OF.values())

encode = msgspec.json.Encoder().encode
#: One event (use :func:`decode_all` for a message, which may hold several).
decode = msgspec.json.Decoder(AnyEvent).decode
#: The body of one EVENTS message.
EventMessage = list[AnyEvent] | AnyEvent  # type: ignore[valid-type]
_decode_message = msgspec.json.Decoder(EventMessage).decode


def decode_all(data: bytes) -> list[Event]:
    """The events of one EVENTS message, in the order they happened."""
    decoded = _decode_message(data)
    return decoded if isinstance(decoded, list) else [decoded]


def kind(event: Event) -> str:
    """The event's tag, e.g. ``"started"``."""
    return _KIND_OF[type(event)]


def rank(event: Event) -> int:
    """A number that grows along one task's life, so a late event never rolls state back."""
    return event.attempt * 10 + event.order


def publication(*events: Event) -> tuple[str, bytes, dict[str, str]]:
    """``(subject, body, headers)`` to publish consecutive events of one task (never of
    several tasks) as one message.

    The subject names the last event; the msg id names them all, so a repeated hop dedupes.
    """
    last = events[-1]
    return (
        subjects.event(last.task_id, kind(last)),
        encode(last) if len(events) == 1 else encode(events),
        {subjects.H_MSG_ID: subjects.msg_id(last.task_id, "+".join(map(_hop, events)), last.attempt)},
    )


def _hop(event: Event) -> str:
    """The event's part of a msg id: its kind, and its time for kinds that repeat."""
    name = kind(event)
    return f"{name}@{event.at!r}" if name in REPEATABLE else name


#: Kinds that can happen more than once in one attempt, so their dedupe id includes the time.
REPEATABLE = frozenset({"progress", "reprioritized"})
#: Kinds that may share a message with a later event (see the module doc), so a subject
#: filter on them misses some; every other kind is always the last of its message.
LEADING = frozenset({"submitted", "started"})


def subject_filter(task_id: str = "*", kind: str | None = None) -> str:
    """The EVENTS filter that finds every event of ``kind`` (all kinds: ``None``) of a task.

    A kind in :data:`LEADING` gets no kind filter: its reader picks it after decoding.
    """
    return subjects.events_filter(task_id, kind if kind and kind not in LEADING else "*")
