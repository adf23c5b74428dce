"""The dead-letter queue: list, show and re-drive dead tasks.

A dead task is a message on ``dlq.<task_id>`` in stream DLQ: its body is the original
submission, its headers carry the type, the attempts and the last error.

Re-driving submits the task again as a new task with fresh attempts: its id is
``<id>-r<DLQ sequence>`` and its labels say ``redrive_of: <id>``, which keeps the link to
the original (whose history stays in EVENTS). The id is derived, not drawn, so running
an interrupted re-drive again sends nothing twice: the submission carries the new id as
``Nats-Msg-Id``, an id that already has a state is skipped, and the DLQ entry is deleted
only after the new submission was stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import APIError, NotFoundError

from .. import subjects
from ..errors import Rejected
from ..model import decode_submission
from ..transport import overload
from ..transport.bus import Bus
from ..transport.reading import ReadStats, Since, read
from .state import StateStore

#: JetStream error code of deleting a message that is not there.
NO_MESSAGE_FOUND = 10057
#: Room left for the ``-r<seq>`` suffix in a 128-character id.
_ID_ROOM = 100


@dataclass(frozen=True)
class DeadTask:
    """One DLQ entry."""

    seq: int
    stored_at: float
    task_id: str
    type: str
    attempts: int
    error: str
    body: bytes

    @property
    def redrive_id(self) -> str:
        return f"{self.task_id[:_ID_ROOM]}-r{self.seq}"


def _entry(seq: int, stored_ns: int, data: bytes, headers: dict[str, str]) -> DeadTask:
    return DeadTask(
        seq=seq,
        stored_at=stored_ns / 1e9,
        task_id=headers.get(subjects.H_TASK_ID, ""),
        type=headers.get(subjects.H_TYPE, ""),
        attempts=int(headers.get(subjects.H_ATTEMPTS, "0") or 0),
        error=headers.get(subjects.H_ERROR, ""),
        body=data,
    )


async def entries(bus: Bus, *, task_type: str | None = None, since: Since | None = None) -> AsyncIterator[DeadTask]:
    """Dead tasks, oldest first, optionally of one type and from a time or sequence."""
    async for stored in read(bus, subjects.DLQ_STREAM, "dlq.*", since or Since(seq=1), stats=ReadStats()):
        entry = _entry(stored.seq, stored.stored_ns, stored.data, stored.headers)
        if task_type is None or entry.type == task_type:
            yield entry


async def show(bus: Bus, task_id: str) -> DeadTask | None:
    """The DLQ entry of one task, or ``None``."""
    try:
        msg = await bus.js.get_last_msg(subjects.DLQ_STREAM, subjects.dlq(task_id))
    except NotFoundError:  # no message on that subject
        return None
    return _entry(msg.seq or 0, 0, msg.data or b"", dict(msg.headers or {}))


@dataclass
class RedriveReport:
    redriven: list[str] = field(default_factory=list)
    already_redriven: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


async def redrive(
    bus: Bus,
    dead: list[DeadTask],
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
    retry_budget_s: float = 0.0,
) -> RedriveReport:
    """Submit each dead task again as a new task; see the module docstring. A submission a
    full TASKS refuses is tried again for ``retry_budget_s``, then
    :class:`~streamsched.errors.Overloaded` is raised (running it again later is safe)."""
    report = RedriveReport()
    store = await StateStore.open(bus)
    for entry in dead:
        new_id = entry.redrive_id
        try:
            envelope = decode_submission(entry.body)
        except Rejected:
            report.unreadable.append(entry.task_id)
            continue
        if await store.get(new_id) is not None:
            report.already_redriven.append(new_id)
        elif not dry_run:
            labels = {**envelope.labels, "redrive_of": entry.task_id}
            body = msgspec.json.encode(msgspec.structs.replace(envelope, id=new_id, labels=labels))
            await overload.publish(bus, subjects.SUBMIT, body, {subjects.H_MSG_ID: new_id}, retry_budget_s)
            report.redriven.append(new_id)
        else:
            report.redriven.append(new_id)
        if not dry_run:
            try:
                await bus.js.delete_msg(subjects.DLQ_STREAM, entry.seq)
            except APIError as exc:
                if exc.err_code != NO_MESSAGE_FOUND:  # else an earlier or parallel run removed it
                    raise
        if progress is not None:
            progress(1)
    return report
