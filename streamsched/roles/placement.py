"""Placing a task that is ready to queue: on its SCHED subject, or held by nats-server until its time.

The master's plain path hands tasks to SCHED in batches (:mod:`streamsched.roles.sched_batches`).
Tasks that were held back first (delayed, waiting for dependencies, chunks of a split,
tasks of a workflow) are placed here, one message each, awaited: they are few beside the
plain ones, and each is placed by an asynchronous step anyway.

A task whose time has not come goes to ``timers.at.<id>`` in TIMERS as a JetStream
message schedule (``Nats-Schedule: @at <time>``) with the task's own SCHED headers and
body: nats-server keeps the task and the time, so no process has to be alive while it
waits, and at its time stores a copy on ``timers.due``, from where a master queues it on
SCHED. ``timers.at.*`` matches no consumer, so no reader takes the schedule itself off
the work queue.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Sequence

import msgspec

from .. import subjects
from ..tracing import TRACEPARENT as _TRACEPARENT
from ..transport.bus import Bus
from . import sched_batches

TRACEPARENT = _TRACEPARENT.encode()

#: The header block of a task on SCHED (without its final empty line: optional headers follow).
_SCHED_HEADERS = "".join(
    f"{line}\r\n"
    for line in (
        "NATS/1.0",
        *(
            f"{name}: %s"
            for name in (
                subjects.H_MSG_ID,
                subjects.H_TASK_ID,
                subjects.H_TYPE,
                subjects.H_PRIORITY,
                subjects.H_REGION,
            )
        ),
    )
).encode()


def at_schedule(at: float, target: str) -> bytes:
    """The header lines that make a message a one-shot message schedule firing onto
    ``target`` at ``at`` (Unix seconds); the target must be a subject of the same stream."""
    return b"Nats-Schedule: @at %s\r\nNats-Schedule-Target: %s\r\n" % (rfc3339(at).encode(), target.encode())


def sched_headers(
    task_id: str,
    task_type: str,
    priority: str,
    region: str,
    *,
    max_attempts: int | None = None,
    timeout_s: float | None = None,
    deadline_at: float | None = None,
    generation: int = 0,
    limits: str | None = None,
    hop: str = "sched",
    trace: str = "",
) -> bytes:
    """The header block of a task on SCHED (routing data travels in headers, so the body
    is forwarded untouched), ending with its empty line. Every value must be valid
    already (the master checks ids and types), so it is encoded in one step."""
    headers = _SCHED_HEADERS % (
        subjects.msg_id(task_id, hop).encode(),
        task_id.encode(),
        task_type.encode(),
        priority.encode(),
        region.encode(),
    )
    if max_attempts is not None:
        headers += b"%s: %d\r\n" % (subjects.H_MAX_ATTEMPTS.encode(), max_attempts)
    if timeout_s is not None:
        headers += b"%s: %s\r\n" % (subjects.H_TIMEOUT.encode(), repr(timeout_s).encode())
    if deadline_at is not None:
        headers += b"%s: %s\r\n" % (subjects.H_DEADLINE.encode(), repr(deadline_at).encode())
    if generation:
        headers += b"%s: %d\r\n" % (subjects.H_GENERATION.encode(), generation)
    if limits is not None:
        headers += b"%s: %s\r\n" % (subjects.H_LIMITS.encode(), limits.encode())
    if trace:
        headers += b"%s: %s\r\n" % (TRACEPARENT, trace.encode())
    return headers + b"\r\n"


class ReadyTask(msgspec.Struct, frozen=True, kw_only=True):
    """A task whose submission was accepted, with everything needed to queue it."""

    id: str
    type: str
    priority: str
    region: str
    body: bytes
    """What the worker decodes: the submission's JSON (see :func:`streamsched.model.decode_submission`)."""
    max_attempts: int | None = None
    timeout_s: float | None = None
    deadline_at: float | None = None
    run_at: float | None = None
    """Held until this time (Unix seconds), when in the future."""
    generation: int = 0
    """The priority override it was last moved by (:mod:`streamsched.roles.reprioritize`), if any."""
    limits: str | None = None
    """Its concurrency key, rate key and fairness key, as its SCHED header (:mod:`streamsched.roles.limits`)."""
    trace: str = ""
    """The ``traceparent`` of its master span, when tracing is on (:mod:`streamsched.tracing`)."""

    def is_delayed(self, now: float) -> bool:
        return self.run_at is not None and self.run_at > now


def rfc3339(at: float) -> str:
    """``at`` (Unix seconds) as the RFC 3339 UTC time a message schedule takes, to the millisecond."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def publication(task: ReadyTask, now: float) -> tuple[str, bytes, bytes]:
    """``(subject, body, headers)`` that queues ``task``, or holds it until ``run_at``."""
    delayed = task.is_delayed(now)
    headers = sched_headers(
        task.id,
        task.type,
        task.priority,
        task.region,
        max_attempts=task.max_attempts,
        timeout_s=task.timeout_s,
        deadline_at=task.deadline_at,
        generation=task.generation,
        limits=task.limits,
        hop="delayed" if delayed else "sched",
        trace=task.trace,
    )
    if not delayed:
        return subjects.sched(task.region, task.priority), task.body, headers
    assert task.run_at is not None
    schedule = at_schedule(task.run_at, subjects.TIMERS_DUE)
    return subjects.delayed(task.id), task.body, headers[:-2] + schedule + b"\r\n"


async def place(bus: Bus, tasks: Sequence[ReadyTask], *, now: float | None = None) -> None:
    """Queue (or hold) each task; returns once JetStream stored all of them, raises if any failed.

    The tasks for one SCHED subject travel in SCHED batch messages, as the master's do
    (:mod:`streamsched.roles.sched_batches`): a regional scheduler then takes a whole
    release of dependants in a few messages. Safe to repeat: a lone task carries a
    ``Nats-Msg-Id`` of its task and hop, so placed again inside the dedupe window it is
    stored once; a task in a batch is stored on WORK once by its own msg id there; a
    schedule published again replaces itself (one schedule per subject).
    """
    if not tasks:
        return
    when = time.time() if now is None else now
    by_subject: dict[str, sched_batches.Entries] = {}
    for task in tasks:
        subject, body, headers = publication(task, when)
        by_subject.setdefault(subject, []).append((headers, body))
    prefix = f"place:{os.urandom(6).hex()}:"
    publications: list[tuple[str, bytes, bytes]] = []
    for subject, parts in by_subject.items():
        for number, batch in enumerate(sched_batches.batches(parts)):
            headers, body = sched_batches.message(batch, f"{prefix}{number}")
            publications.append((subject, body, headers))
    gathering = await bus.publish_gathered(publications)
    await gathering.done
    for result in gathering.results:
        if isinstance(result, BaseException):
            raise result
