"""The master's checks of a task's fields, shared with what checks tasks before sending them
(a schedule's template, the tasks of a batch or of a file)."""

from __future__ import annotations

from .. import subjects
from ..config import Settings
from ..errors import Rejected
from ..model import REGION_FAILOVER, Envelope
from . import dependencies, limits, splits
from .timing import check_times, has_times

#: What :func:`streamsched.subjects.is_type` admits, for error messages.
TYPE_RULE = "1-200 characters of A-Z a-z 0-9 _ - : / in words joined by single dots"


def check_fields(envelope: Envelope, settings: Settings) -> None:
    """The master's checks of a decoded task's fields; raises :class:`Rejected` with the reason."""
    if not subjects.is_type(envelope.type):
        raise Rejected(f"type {envelope.type!r} is not a valid handler name ({TYPE_RULE})")
    if envelope.priority not in settings.priorities:
        raise Rejected(f"unknown priority {envelope.priority!r} (expected one of {', '.join(settings.priorities)})")
    if envelope.id is not None and not subjects.is_token(envelope.id):
        raise Rejected(f"id {envelope.id!r} is not subject-safe (1-128 characters of A-Z a-z 0-9 _ -)")
    if envelope.region is not None and envelope.region not in settings.regions:
        raise Rejected(f"unknown region {envelope.region!r} (expected one of {', '.join(settings.regions)})")
    if envelope.region_failover is not None and envelope.region_failover not in REGION_FAILOVER:
        raise Rejected(f"unknown region_failover {envelope.region_failover!r} (expected one of {', '.join(REGION_FAILOVER)})")
    if envelope.max_attempts is not None and not 1 <= envelope.max_attempts <= settings.max_deliver:
        raise Rejected(f"`max_attempts` must be between 1 and {settings.max_deliver}")
    if envelope.timeout_s is not None and envelope.timeout_s <= 0:
        raise Rejected("`timeout_s` must be positive")
    dependencies.check(envelope, settings)
    limits.check(envelope, settings)
    if envelope.split is not None:
        splits.parse(envelope, settings)
    if has_times(envelope):
        check_times(envelope)
    if envelope.cron is not None:
        raise Rejected("`cron` does not go on a task: make a schedule with `streamsched schedule add` (or Client.add_schedule)")
