"""Lifecycle events: one tagged union, recorded in EVENTS.

An EVENTS message holds one event or a JSON array of events, of any tasks: a role records
the events of what it handled in one loop tick together, on ``events.<source>`` (see
:mod:`streamsched.eventlog.recorder`). Each task's events are in the order they happened.
Messages are most of what a task costs (a message of its own for each event would take a
third of a task's CPU); for the same reason a worker records a quick task's ``started``
with its outcome (as Temporal does for an activity's start and completion).

EVENTS is the source of truth; the KV projection (:mod:`streamsched.eventlog.state`) is a fold
of these records, and the replay tools read them back. Every event carries:

* ``v``: the schema version (absent on the wire means 1; later versions always write it);
* ``task_id``, ``attempt`` (0 before the first run), ``region`` and, for events a worker
  publishes, ``worker``;
* ``at``: when the fact happened (Unix seconds). When it was *published* is the stream's
  own timestamp of the message, so it is not repeated in the body;
* ``trace``: the W3C ``traceparent`` of the span of the hop that recorded it, when tracing
  is on (:mod:`streamsched.tracing`); its trace id is the task's trace.

Fields equal to their default are left out of the JSON to keep EVENTS small. Schema
evolution: add fields with defaults; a change that old readers would misread bumps
``SCHEMA_VERSION``; readers skip (and count) events of a version they do not know.
``streamsched schema events`` prints the JSON Schema (see docs/EVENTS.md).
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from .. import subjects
from ..model import MaybeRaw, Status

SCHEMA_VERSION = 1


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="kind", gc=False):
    """Fields every event has. A task's events are ordered by their rank, ``attempt * 10 +
    order`` (see :func:`streamsched.eventlog.state.fold`).

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
    status = Status.WAITING
    order = 2


class Scheduled(Event, frozen=True, tag="scheduled"):
    """The master placed the task on its region's SCHED subject."""

    priority: str
    status = Status.PENDING
    order = 3


class Stranded(Event, frozen=True, tag="stranded"):
    """The master queued the task in its region although that region has no live regional
    scheduler or worker now (a task pinned there with ``region_failover: wait``): it waits
    there for one, and ``reason`` says why. Order 0, as ``reprioritized``: a note beside
    the life of the task, it never moves the status."""

    reason: str
    status = Status.PENDING
    order = 0


class Rerouted(Event, frozen=True, tag="rerouted"):
    """The task named a region (``requested``) that has no live regional scheduler or
    worker, and may run anywhere (``region_failover: any``): the master queued it in
    ``region`` instead, for ``reason``. Never moves the status (order 0)."""

    requested: str
    reason: str
    status = Status.PENDING
    order = 0


class Dispatched(Event, frozen=True, tag="dispatched"):
    """The regional scheduler released the task onto WORK for workers to fetch."""

    priority: str
    status = Status.SCHEDULED
    order = 5


class Held(Event, frozen=True, tag="held"):
    """The regional scheduler released the task onto WORK, where nothing takes it yet: no live
    worker of its region handles its type (``reason`` says so). It starts, and moves on to
    ``started``, as soon as such a worker appears. Takes the place of ``dispatched``."""

    priority: str
    reason: str
    status = Status.WAITING
    order = 4


class Started(Event, frozen=True, tag="started"):
    """A worker began an attempt."""

    status = Status.RUNNING
    order = 6


class Progress(Event, frozen=True, tag="progress"):
    """A running handler reported progress (``fraction`` in 0..1 and/or a message)."""

    fraction: float | None = None
    message: str = ""
    status = Status.RUNNING
    order = 6


class Retrying(Event, frozen=True, tag="retrying"):
    """An attempt failed and the task comes back after ``delay_s``."""

    error: str
    delay_s: float
    status = Status.RETRYING
    order = 7


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
    """The task was cancelled (``streamsched cancel``): by the canceller before it was
    queued (delayed, waiting) or while it was (at once, and again by the role that meets
    it), by the regional scheduler or a worker before it started, or by a worker while it
    ran. ``result`` holds what a handler returned after its
    cancellation, if it did."""

    reason: str = ""
    result: MaybeRaw = msgspec.UNSET
    status = Status.CANCELLED
    order = 9


class Reprioritized(Event, frozen=True, tag="reprioritized"):
    """The task's priority was changed while it waited. Recorded with the task's current
    ``attempt``: order 0 then ranks it below every event of that attempt, so it never
    moves the status."""

    priority: str
    previous: str = ""
    status = Status.PENDING
    order = 0


AnyEvent = (
    Submitted
    | Rejected
    | Waiting
    | Scheduled
    | Stranded
    | Rerouted
    | Dispatched
    | Held
    | Started
    | Progress
    | Retrying
    | Succeeded
    | Failed
    | Dead
    | Cancelled
    | Reprioritized
)

_KIND_OF: dict[type[Event], str] = {cls: cls.__struct_config__.tag for cls in AnyEvent.__args__}
#: Events after which a task never changes again.
FINAL_TYPES: frozenset[type] = frozenset(cls for cls in _KIND_OF if cls.status.is_final)
KINDS: tuple[str, ...] = tuple(_KIND_OF.values())

encode = msgspec.json.Encoder().encode
#: One event (use :func:`decode_all` for a message, which may hold several).
decode = msgspec.json.Decoder(AnyEvent).decode
#: The body of one EVENTS message.
EventMessage = list[AnyEvent] | AnyEvent
_decode_message = msgspec.json.Decoder(EventMessage).decode


def decode_all(data: bytes) -> list[AnyEvent]:
    """The events of one EVENTS message, in the order they were recorded."""
    decoded = _decode_message(data)
    return decoded if isinstance(decoded, list) else [decoded]


def kind(event: Event) -> str:
    """The event's tag, e.g. ``"started"``."""
    return _KIND_OF[type(event)]


#: Kinds that can happen more than once in one attempt; every other kind happens at most
#: once per attempt, so a second one is a copy recorded again by a redelivered hop.
REPEATABLE = frozenset({"progress", "reprioritized"})


def message(events: list[Event], source: str) -> tuple[str, bytes]:
    """``(subject, body)`` of one EVENTS message holding ``events`` (what the recorder
    publishes; for tools and tests that write events themselves)."""
    return subjects.events(source), encode(events)
