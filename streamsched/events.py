"""Lifecycle events: one tagged union, published on ``events.<task_id>.<kind>``.

EVENTS is the source of truth; the KV projection (:mod:`streamsched.state`) is a fold
of these records. Every event carries a schema version ``v``, the task id, the attempt
it belongs to and ``at``, the time the fact happened (Unix seconds).
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from . import subjects
from .model import Status

SCHEMA_VERSION = 1


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Fields every event has. ``rank`` orders the events of one task (see :func:`rank`)."""

    task_id: str
    at: float
    attempt: int = 0
    v: int = SCHEMA_VERSION

    #: The status this event puts the task in.
    status: ClassVar[Status]
    #: Position of the event within one attempt; a final event outranks the rest.
    order: ClassVar[int]


class Submitted(Event, frozen=True, tag="submitted"):
    type: str
    priority: str
    region: str
    labels: dict[str, str] = {}
    status = Status.PENDING
    order = 1


class Rejected(Event, frozen=True, tag="rejected"):
    reason: str
    original: bytes
    status = Status.REJECTED
    order = 9


class Scheduled(Event, frozen=True, tag="scheduled"):
    """The master placed the task on its region's SCHED subject."""

    region: str
    priority: str
    status = Status.PENDING
    order = 2


class Dispatched(Event, frozen=True, tag="dispatched"):
    """The regional scheduler released the task onto WORK for workers to fetch."""

    region: str
    priority: str
    status = Status.SCHEDULED
    order = 3


class Started(Event, frozen=True, tag="started"):
    worker: str
    status = Status.RUNNING
    order = 4


class Retrying(Event, frozen=True, tag="retrying"):
    error: str
    delay_s: float
    status = Status.RETRYING
    order = 5


class Succeeded(Event, frozen=True, tag="succeeded"):
    result: msgspec.Raw = msgspec.Raw(b"null")
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


AnyEvent = Submitted | Rejected | Scheduled | Dispatched | Started | Retrying | Succeeded | Failed | Dead

KINDS: tuple[str, ...] = tuple(cls.__struct_config__.tag for cls in AnyEvent.__args__)  # type: ignore[attr-defined]

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(AnyEvent).decode


def kind(event: Event) -> str:
    """The event's tag, e.g. ``"started"``."""
    return event.__struct_config__.tag  # type: ignore[return-value]


def rank(event: Event) -> int:
    """A number that grows along one task's life, so a late event never rolls state back."""
    return event.attempt * 10 + event.order


def publication(event: Event) -> tuple[str, bytes, dict[str, str]]:
    """``(subject, body, headers)`` to publish ``event``; the msg id dedupes a repeated hop."""
    name = kind(event)
    return (
        subjects.event(event.task_id, name),
        encode(event),
        {subjects.H_MSG_ID: subjects.msg_id(event.task_id, name, event.attempt)},
    )
