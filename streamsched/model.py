"""The task envelope and the task state, as typed msgspec records.

Schema evolution rules:

* New fields are added with a default, so old producers stay valid.
* Unknown fields are refused: a typo such as ``"priorty"`` must not silently run a
  task with the wrong meaning. Fields of later features that this version does not
  act on yet are declared, so they are never refused *as unknown*; the master refuses
  them as *not supported yet* instead of silently ignoring their meaning.
* ``payload`` and ``result`` are kept as raw JSON (:class:`msgspec.Raw`): hops forward
  them untouched and only the handler (or the reader) decodes them.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

#: Raw JSON bytes, or absent. (msgspec cannot put ``Raw`` in a union with ``None``,
#: nor render a ``Raw`` default in a JSON Schema; ``UNSET`` does both.)
MaybeRaw = msgspec.Raw | msgspec.UnsetType


def raw_value(raw: MaybeRaw) -> Any:
    """The decoded JSON of a raw field; ``None`` when it is absent."""
    return None if raw is msgspec.UNSET else msgspec.json.decode(raw)


#: Priority levels, highest first. Each is its own subject and durable consumer.
PRIORITIES: tuple[str, ...] = ("high", "medium", "low")
DEFAULT_PRIORITY = "medium"


class Status(str, enum.Enum):
    """Where a task is in its life; the ``status`` field of the KV projection."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    DEAD = "dead"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.DEAD, Status.REJECTED, Status.CANCELLED})


# gc=False on the structs of every message (here and in events.py): built from JSON, they
# cannot hold a reference cycle, and the projector keeps tens of thousands of them cached, which
# Python's cyclic collector would otherwise walk on every full collection.
class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A task as submitted to ``tasks.submit`` (JSON)."""

    type: str
    """Handler name, e.g. ``email.send``."""
    id: str | None = None
    """Subject-safe token, also the dedupe key; generated (time-sortable) when missing."""
    payload: MaybeRaw = msgspec.UNSET
    """Handler input, any JSON (absent means ``null``); forwarded as raw bytes."""
    priority: str = DEFAULT_PRIORITY
    """One of :data:`PRIORITIES`."""
    region: str | None = None
    """Region affinity; the master chooses when missing."""
    timeout_s: float | None = None
    """Per-attempt time limit in seconds; the handler's default when missing."""
    max_attempts: int | None = None
    """Attempts before the task is dead-lettered; the handler's default when missing."""
    labels: dict[str, str] = {}
    """Free-form labels, kept in the task state."""
    # Declared for later features; the master refuses them as "not supported yet".
    depends_on: list[str] = []
    run_at: str | None = None
    delay_s: float | None = None
    cron: str | None = None
    split: dict[str, Any] | None = None
    idempotency_key: str | None = None


#: Envelope fields that are accepted by the schema but not acted on yet.
UNSUPPORTED_FIELDS = ("depends_on", "run_at", "delay_s", "cron", "split", "idempotency_key")


class TaskState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The latest state of one task: the value of KV ``tasks.<id>``."""

    id: str
    status: Status
    type: str | None = None
    priority: str | None = None
    region: str | None = None
    attempts: int = 0
    """Attempts started so far."""
    result: MaybeRaw = msgspec.UNSET
    """The handler's return value as raw JSON (absent until it succeeds)."""
    error: str | None = None
    worker: str | None = None
    progress: float | None = None
    """Last reported progress of the running attempt (0..1)."""
    labels: dict[str, str] = {}
    submitted_at: float | None = None
    scheduled_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    priority_changed_at: float | None = None
    """When the priority was last changed by a ``reprioritized`` event."""
    rank: int = 0
    """Order of the last event folded in; a lower-ranked event never overwrites it."""


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def derive_task_id(stored_at_ns: int, stream_seq: int) -> str:
    """A ULID-shaped id (26 chars, sortable by time) for a submission that has none.

    It is derived from the submission's place in the TASKS stream rather than drawn at
    random, so a master that crashes before acking and sees the message again gives it
    the same id, and the downstream dedupe drops the second copy.
    """
    return _base32(stored_at_ns // 1_000_000, 10) + _base32(stream_seq, 16)


encode = msgspec.json.Encoder().encode
envelope_decoder = msgspec.json.Decoder(Envelope)
state_decoder = msgspec.json.Decoder(TaskState)
