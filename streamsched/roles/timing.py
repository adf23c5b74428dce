"""When a task may start and until when it may: ``run_at``/``delay_s`` and ``deadline``/``deadline_s``.

Relative times count from the submission's place in TASKS (the time JetStream stored it),
not from when a master read it: a submission read late, or redelivered, keeps its times.
"""

from __future__ import annotations

import datetime
import math

import msgspec

from ..errors import Rejected
from ..model import Envelope, Submission
from . import limits
from .placement import ReadyTask


def parse_time(value: str, field: str) -> float:
    """An RFC 3339 time with a zone (``2026-05-01T09:00:00Z``, ``...+02:00``) as Unix seconds."""
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(f"`{field}` {value!r} is not an RFC 3339 time (e.g. 2026-05-01T09:00:00Z)") from None
    if moment.tzinfo is None:
        raise Rejected(f"`{field}` {value!r} has no time zone: add Z or an offset such as +02:00")
    return moment.timestamp()


def _check_seconds(value: float | None, field: str, *, zero: bool) -> None:
    if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and not zero)):
        raise Rejected(f"`{field}` must be {'zero or more' if zero else 'more than zero'} seconds")


def check_times(envelope: Envelope) -> None:
    """Refuse time fields that cannot be honoured, with the reason (no clock needed)."""
    if envelope.run_at is not None and envelope.delay_s is not None:
        raise Rejected("give either `run_at` or `delay_s`, not both")
    if envelope.deadline is not None and envelope.deadline_s is not None:
        raise Rejected("give either `deadline` or `deadline_s`, not both")
    _check_seconds(envelope.delay_s, "delay_s", zero=True)
    _check_seconds(envelope.deadline_s, "deadline_s", zero=False)
    if envelope.run_at is not None:
        parse_time(envelope.run_at, "run_at")
    if envelope.deadline is not None:
        parse_time(envelope.deadline, "deadline")


def has_times(envelope: Envelope) -> bool:
    """True when any time field is set (a few attribute reads)."""
    return envelope.run_at is not None or envelope.delay_s is not None or envelope.deadline is not None or envelope.deadline_s is not None


def start_at(envelope: Envelope, submitted_at: float) -> float | None:
    """When the task may start (Unix seconds), or ``None`` for at once; fields checked already."""
    if envelope.run_at is not None:
        return parse_time(envelope.run_at, "run_at")
    if envelope.delay_s is not None:
        return submitted_at + envelope.delay_s
    return None


def deadline_at(envelope: Envelope, submitted_at: float) -> float | None:
    """After when no attempt may start (Unix seconds), or ``None``; fields checked already."""
    if envelope.deadline is not None:
        return parse_time(envelope.deadline, "deadline")
    if envelope.deadline_s is not None:
        return submitted_at + envelope.deadline_s
    return None


def check_window(start: float | None, deadline: float | None) -> None:
    """Refuse a task held until after its own deadline: it could never run."""
    if start is not None and deadline is not None and start >= deadline:
        raise Rejected("the task would start (`run_at`/`delay_s`) at or after its deadline, so it could never run")


def ready_task(submission: Submission, region: str, submitted_at: float) -> ReadyTask:
    """A checked submission (its id filled in) as a task to place, with its start and its
    deadline; raises :class:`Rejected` when it would start at or after its deadline."""
    assert submission.id is not None
    task = ReadyTask(
        id=submission.id,
        type=submission.type,
        priority=submission.priority,
        region=region,
        body=msgspec.json.encode(submission),
        max_attempts=submission.max_attempts,
        timeout_s=submission.timeout_s,
        deadline_at=deadline_at(submission, submitted_at),
        run_at=start_at(submission, submitted_at),
        limits=limits.header_value(submission),
    )
    check_window(task.run_at, task.deadline_at)
    return task
