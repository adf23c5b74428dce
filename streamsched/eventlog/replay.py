"""Replaying submissions: copy the original submissions of a time window from TASKS to
another deployment, rate-limited.

Each copy carries the id the source gave the task, and the target's dedupe plus a check
of its KV make a repeated or resumed replay skip what already arrived. Nothing runs
again in the source. A submission goes to the subject it came in on, plain
``tasks.submit`` or ``tasks.submit.<priority>`` (which the target must take: a priority
it does not have is refused).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import msgspec

from .. import subjects
from ..errors import Rejected
from ..model import decode_submission, derive_task_id
from ..transport import overload
from ..transport.bus import Bus
from ..transport.reading import ReadStats, Since, read
from .state import StateStore

log = logging.getLogger("streamsched.replay")

#: Called with the number of submissions sent so far.
Progress = Callable[[int], None]


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
    retry_budget_s: float = 0.0,
) -> ReplayReport:
    """Send the window's original submissions to ``target`` (``None``: dry run, count only).
    A submission the target's full TASKS refuses is tried again for ``retry_budget_s``, then
    :class:`~streamsched.errors.Overloaded` is raised (replaying again skips what arrived)."""
    report = ReplayReport()
    target_store = await StateStore.open(target) if target is not None else None
    began = time.monotonic()
    stats = ReadStats()
    async for stored in read(source, subjects.TASKS_STREAM, subjects.SUBMIT_ALL, since, stats=stats):
        seq, stored_ns, data = stored.seq, stored.stored_ns, stored.data
        if until is not None and stored_ns / 1e9 > until.timestamp():
            break
        try:
            envelope = decode_submission(data)
        except Rejected:
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
            # On the subject it came in on: one of a priority also gives that priority to a body that names none.
            ack = await overload.publish(target, stored.subject, body, {subjects.H_MSG_ID: task_id}, retry_budget_s)
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
