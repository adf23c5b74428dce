"""Batch submissions: ``{"batch": [task, ...]}`` on ``tasks.submit``, taken all or nothing
(on ``tasks.submit.<priority>`` too, where each task gets that priority or must name it).

Every task is checked first, as the master checks one (and ids must differ); one invalid
task rejects the whole batch with a reason naming it (its index and id). Otherwise the
tasks are stored with JetStream's atomic batch publish (:mod:`streamsched.transport.atomic`),
so none is queued unless all are: SCHED allows atomic batches (verified on a work queue
that discards new). The tasks travel in SCHED batch messages (those of one subject
together, :mod:`streamsched.roles.sched_batches`), since a regional scheduler forwards a
single task's header block to WORK as it came, and the ``Nats-Batch-*`` headers of an
atomic publish must not reach WORK; a batch message's own headers stay on SCHED.

The messages' ids are ``<batch id>:sched:<n>``, so a redelivered batch whose publish was
already stored fails as a whole with "duplicate message id", which means it is stored.
Delayed tasks of the batch are then held in TIMERS each on its own (deduplicated by
``<task>:delayed:0``), since TIMERS holds message schedules, not batches: they are all
valid, and a failure naks the submission, which comes back and places the rest.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from .. import subjects
from ..errors import Rejected
from ..eventlog import events as ev
from ..model import Submission
from ..transport import atomic
from ..transport.bus import Bus
from . import sched_batches
from .placement import ReadyTask, place, publication
from .timing import ready_task

#: Tasks in one batch at most: what one atomic publish stores.
MAX_TASKS = atomic.MAX_MESSAGES
#: Fields whose steps run per task outside a batch; a batch refuses them.
_NOT_IN_A_BATCH = ("idempotency_key", "depends_on", "split")


class Gate(Protocol):
    """What the master decides about one task: the :class:`~streamsched.roles.master.Master`."""

    def validate(self, data: bytes, task_id_if_missing: Callable[[], str], priority: str | None = None) -> Submission: ...

    def pick_region(self, task_id: str) -> str: ...

    async def recorded_regions(self, task_ids: Sequence[str]) -> dict[str, str]: ...


def _named(index: int, item: object) -> str:
    task_id = item.get("id") if isinstance(item, dict) else None
    return f"task {index}" + (f" (id {task_id!r})" if isinstance(task_id, str) else "")


def _nth_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


def ready_tasks(
    items: Sequence[object], gate: Gate, batch_id: str, submitted_at: float, priority: str | None = None
) -> list[tuple[ReadyTask, dict[str, str]]]:
    """Each task of a batch with its labels, all checked; raises :class:`Rejected` naming
    the first invalid one. ``priority``: the one the batch's subject names, as for a task
    published there (see :meth:`Gate.validate`)."""
    if not items:
        raise Rejected("the batch holds no task")
    if len(items) > MAX_TASKS:
        raise Rejected(f"the batch holds {len(items)} tasks, over the limit of {MAX_TASKS}")
    tasks: list[tuple[ReadyTask, dict[str, str]]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        try:
            # A task without an id gets one from the batch's, stable across redeliveries.
            submission = gate.validate(msgspec.json.encode(item), functools.partial(_nth_id, batch_id, index), priority)
            for field in _NOT_IN_A_BATCH:
                if getattr(submission, field):
                    raise Rejected(f"`{field}` is not taken inside a batch; submit that task on its own")
            task_id = submission.id
            assert task_id is not None
            if task_id in seen:
                raise Rejected(f"its id is also task {seen[task_id]}'s")
            seen[task_id] = index
            task = ready_task(submission, submission.region or gate.pick_region(task_id), submitted_at)
        except Rejected as exc:
            raise Rejected(f"batch rejected: {_named(index, item)} is invalid: {exc}") from None
        tasks.append((task, submission.labels))
    return tasks


def sched_messages(tasks: Sequence[ReadyTask], batch_id: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """The SCHED messages of queued tasks: those of one subject together, in the format of
    :mod:`streamsched.roles.sched_batches` (up to its ``MAX_TASKS`` each), so the regional
    schedulers read them as any batch. Their ``Nats-Msg-Id`` is the batch's and the part's."""
    by_subject: dict[str, list[list[tuple[bytes, bytes]]]] = {}
    for task in tasks:
        subject, body, block = publication(task, 0.0)
        parts = by_subject.setdefault(subject, [[]])
        if len(parts[-1]) >= sched_batches.MAX_TASKS or sum(len(b) + len(h) for h, b in parts[-1]) + len(body) > sched_batches.MAX_BYTES:
            parts.append([])
        parts[-1].append((block, body))
    messages: list[tuple[str, bytes, dict[str, str]]] = []
    for subject, parts in by_subject.items():
        for entries in parts:
            headers = {subjects.H_MSG_ID: subjects.msg_id(batch_id, "sched", len(messages)), subjects.H_BATCH: str(len(entries))}
            messages.append((subject, msgspec.msgpack.encode(entries), headers))
    return messages


async def place_atomically(bus: Bus, tasks: Sequence[ReadyTask], batch_id: str, now: float) -> None:
    """Store the queued tasks in one atomic batch (stored already: a redelivery), then hold
    the delayed ones in TIMERS, each deduplicated on its own."""
    queued = [task for task in tasks if not task.is_delayed(now)]
    if queued:
        try:
            await atomic.publish_atomic(bus, sched_messages(queued, batch_id))
        except atomic.BatchRejected as exc:
            # Its message ids are this batch's alone: a duplicate means all of it is stored.
            if exc.code != atomic.DUPLICATE_MSG_ID:
                raise
    delayed = [task for task in tasks if task.is_delayed(now)]
    if delayed:
        await place(bus, delayed, now=now)


def events_of(tasks: Sequence[tuple[ReadyTask, dict[str, str]]], now: float) -> list[ev.Event]:
    """``submitted`` and then ``scheduled`` (or ``waiting`` until its time) of each task."""
    events: list[ev.Event] = []
    for task, labels in tasks:
        trace = task.trace
        events.append(ev.Submitted(task_id=task.id, at=now, type=task.type, priority=task.priority, region=task.region, labels=labels, trace=trace))
        if task.is_delayed(now):
            events.append(ev.Waiting(task_id=task.id, at=now, region=task.region, until=task.run_at, trace=trace))
        else:
            events.append(ev.Scheduled(task_id=task.id, at=now, region=task.region, priority=task.priority, trace=trace))
    return events
