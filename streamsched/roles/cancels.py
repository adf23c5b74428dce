"""Cancellation: the request on ``tasks.cancel``, the durable fact in KV ``cancels``, and the
roles' in-memory view of it.

A cancel request (:meth:`streamsched.client.Client.cancel`) is a JetStream publish on
``tasks.cancel`` (msg id ``<task id>:cancel``), read by a master's :class:`Canceller`
through the durable ``canceller``. The canceller writes the fact to KV ``cancels`` (key =
task id, value = reason and time, kept ``cancel_ttl_s``) and then stops what it can reach
itself:

* a delayed task's message schedule (``timers.at.<id>`` in TIMERS) is purged, after its
  ``cancelled`` is recorded;
* a task waiting for its dependencies is cancelled through
  :meth:`~streamsched.roles.dependencies.Dependencies.cancel`: its record in KV ``waiting``
  is marked cancelled by compare-and-set (never deleted, so a redelivered submission does
  not register it again), its ``cancelled`` is recorded, and the tasks waiting for it are
  cancelled in turn as for any dependency that did not succeed.

Each step is safe to repeat: a request redelivered after a crash finds the schedule or the
record (marked but not acted on) again and finishes the job.

Queued and running tasks are stopped by the roles that hold them: the regional scheduler
at dispatch and the worker before it runs a task skip a cancelled one (they record
``cancelled`` and take it off their stream), and a worker cancels a running one (see
:mod:`streamsched.roles.worker`). They know the cancelled ids from a :class:`CancelWatch`:
a mirror of KV ``cancels`` kept current by an ordered consumer, so the check on their
per-task path is a truth test of a dict, and a lookup only while it holds something. The
canceller records a queued task (its state neither final nor ``running``) ``cancelled``
at once all the same, so its state does not wait for a role to reach it.

A request naming a workflow (``workflow``: true) is expanded here to every task of it not
yet finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from .. import logs, subjects
from ..config import Settings
from ..eventlog import events as ev
from ..eventlog.state import StateStore
from ..model import Status
from ..transport.bus import Bus, term_with_reason
from ..transport.kv_watch import BucketWatch
from ..transport.streams import CANCELLER_WINDOW
from ..transport.wire import Delivery
from .dependencies import Dependencies
from .durable_reader import DurableReader
from .workflows import WorkflowTracker

log = logging.getLogger("streamsched.cancels")

#: Cancelled ids a watch keeps at most; past it the oldest are forgotten first. The bucket's
#: TTL (``cancel_ttl_s``) bounds it too: an expired entry leaves a marker that removes it.
MAX_WATCHED = 100_000
#: Seconds a role waits at start for the watch to load the ids cancelled so far.
LOAD_TIMEOUT_S = 5.0
#: Tasks of one workflow cancelled at the same time.
WORKFLOW_FANOUT = 64


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of a message on ``tasks.cancel``."""

    id: str
    reason: str = ""
    at: float = 0.0
    workflow: bool = False
    """``id`` names a workflow: each of its tasks that has not finished is cancelled."""


class CancelRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The value of KV ``cancels.<task id>``."""

    reason: str = ""
    at: float = 0.0


_decode_request = msgspec.json.Decoder(CancelRequest).decode
_decode_record = msgspec.json.Decoder(CancelRecord).decode


def request_message(task_id: str, reason: str, *, workflow: bool = False) -> tuple[str, bytes, dict[str, str]]:
    """``(subject, body, headers)`` of a cancel request (of a workflow: ``task_id`` is its id)."""
    body = msgspec.json.encode(CancelRequest(id=task_id, reason=reason, at=time.time(), workflow=workflow))
    hop = "cancel-workflow" if workflow else "cancel"  # a task may share its id with a workflow
    return subjects.CANCEL, body, {subjects.H_MSG_ID: subjects.msg_id(task_id, hop)}


class Canceller(DurableReader):
    """A master's consumer of cancel requests: records the fact, stops what is not queued yet."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        super().__init__(settings, bus, subjects.TASKS_STREAM, subjects.CANCELLER_CONSUMER, CANCELLER_WINDOW, source="canceller")
        self.dependencies = Dependencies(settings, bus, source="canceller")
        self.workflows = WorkflowTracker(bus)
        self._tasks: StateStore | None = None
        self.cancelled = 0

    def _on_message(self, _level: int, msg: Delivery) -> None:
        try:
            request = _decode_request(msg.data)
        except msgspec.DecodeError as exc:
            log.error("unreadable cancel request (%s); terminating it", exc)
            self.settler.settle(msg, term_with_reason(f"unreadable cancel request: {exc}"))
            return
        if not subjects.is_token(request.id):
            self.settler.settle(msg, term_with_reason(f"invalid task id {request.id!r}"))
            return
        self.settler.settle_after(msg, self.cancel(request), f"cancel of {request.id}")

    async def cancel(self, request: CancelRequest) -> None:
        """Carry out a request: cancel its task, or each unfinished task of its workflow."""
        at = request.at or time.time()
        if request.workflow:
            await self._cancel_workflow(request.id, request.reason, at)
        else:
            await self._cancel_task(request.id, request.reason, at)

    async def _cancel_workflow(self, workflow_id: str, reason: str, at: float) -> None:
        """Cancel every task its workflow record does not show finished (a task that finished
        since keeps its outcome), at most :data:`WORKFLOW_FANOUT` at a time.

        Every cancel is stored before any task is stopped: cancelling a running task
        releases its dependants under the ``run`` policy, and the regional scheduler must
        know them cancelled by then. A task the master has not registered yet is caught the
        same way: its cancel is in KV ``cancels`` before it reaches a queue, and a dependant
        registered later finds its dependencies cancelled."""
        record = await self.workflows.get(workflow_id)
        if record is None:
            log.warning("no workflow %s to cancel (expired, or never taken in)", workflow_id)
            return
        unfinished = [task_id for task_id, status in record.tasks.items() if not Status(status).is_final]
        await _each(unfinished, lambda task_id: self._store(task_id, reason, at))
        await _each(unfinished, lambda task_id: self._stop(task_id, reason))
        log.info("cancelled workflow %s: %d unfinished task(s)", workflow_id, len(unfinished))

    async def _cancel_task(self, task_id: str, reason: str, at: float) -> None:
        await self._store(task_id, reason, at)
        await self._stop(task_id, reason)

    async def _store(self, task_id: str, reason: str, at: float) -> None:
        """The cancel in KV ``cancels``, which the regional schedulers and workers watch."""
        cancels = await self.bus.js.key_value(subjects.CANCELS_BUCKET)
        record = msgspec.json.encode(CancelRecord(reason=reason, at=at))
        with contextlib.suppress(KeyWrongLastSequenceError):  # cancelled before: the first reason stands
            await cancels.create(subjects.state_key(task_id), record)

    async def _stop(self, task_id: str, reason: str) -> None:
        """Stop the task if it is delayed or waiting (what no other role holds); record a
        queued one cancelled at once (see :meth:`_record_queued`)."""
        js = self.bus.js
        stopped = False
        cancelled = ev.Cancelled(task_id=task_id, at=time.time(), reason=reason)
        schedule = subjects.delayed(task_id)
        if await _holds(self.bus, subjects.TIMERS_STREAM, schedule):
            await self._record(cancelled)
            await js.purge_stream(subjects.TIMERS_STREAM, subject=schedule)
            stopped = True
        if await self.dependencies.cancel(task_id, reason):  # records `cancelled` itself
            stopped = True
        if stopped:
            self.cancelled += 1
            log.info("cancelled %s before it was queued: %s", task_id, reason or "(no reason)", extra=logs.task(task_id))
        else:
            await self._record_queued(task_id, reason)

    async def _record_queued(self, task_id: str, reason: str) -> None:
        """Record ``cancelled`` for a task whose state is neither final nor ``running``: one
        queued on SCHED or WORK would otherwise show ``scheduled`` until a role reaches it,
        which with no worker may be long. That role still skips it (its cancel is in KV
        already) and records it again: the fold is idempotent.

        The event carries the task's current attempt, so the task shows ``cancelled`` at
        once, while any outcome of a later attempt outranks it: a task a worker had started
        already (its state lagging) keeps the outcome that worker records. A running task
        is left to its worker, an unknown one (not registered yet) to the roles that meet it."""
        if self._tasks is None:
            self._tasks = await StateStore.open(self.bus)
        found = await self._tasks.get(task_id)
        if found is None:
            return
        state = found[0]
        if state.status.is_final or state.status is Status.RUNNING:
            return
        await self._record(ev.Cancelled(task_id=task_id, at=time.time(), attempt=state.attempts, region=state.region or "", reason=reason))
        self.cancelled += 1
        log.info("cancelled %s while it was %s: %s", task_id, state.status.value, reason or "(no reason)", extra=logs.task(task_id, state.type or ""))

    async def _record(self, event: ev.Event) -> None:
        recorder = self.settler.recorder
        assert recorder is not None, "the canceller's settler records events"
        await recorder.record((event,))


async def _each(task_ids: list[str], step: Callable[[str], Awaitable[None]]) -> None:
    """``step`` of every id, at most :data:`WORKFLOW_FANOUT` at a time; raises the first failure
    once all are done (the request then comes back: every step is safe to repeat)."""
    limit = asyncio.Semaphore(WORKFLOW_FANOUT)

    async def one(task_id: str) -> None:
        async with limit:
            await step(task_id)

    outcomes = await asyncio.gather(*(one(task_id) for task_id in task_ids), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def _holds(bus: Bus, stream: str, subject: str) -> bool:
    """True when ``stream`` holds a message on ``subject``."""
    try:
        await bus.js.get_msg(stream, subject=subject, direct=True)
    except NotFoundError:
        return False
    return True


class CancelWatch:
    """The ids in KV ``cancels`` (task id -> reason), kept current by a :class:`BucketWatch`.

    ``ids`` is a plain dict so the roles' per-task check is ``if ids and task_id in ids``:
    nothing but a truth test while no task is cancelled. ``on_cancel(task_id, reason)`` is
    called on the event loop for each id that appears after the initial load.
    """

    def __init__(self, bus: Bus, on_cancel: Callable[[str, str], None] | None = None, *, limit: int = MAX_WATCHED) -> None:
        self.on_cancel = on_cancel
        self.limit = limit
        self.ids: dict[str, str] = {}
        self._watch = BucketWatch(bus, subjects.CANCELS_BUCKET, self._on_change)

    async def start(self) -> None:
        """Subscribe and wait (up to :data:`LOAD_TIMEOUT_S`) until the ids cancelled so far are in."""
        if not await self._watch.start(LOAD_TIMEOUT_S):
            log.warning("cancelled ids not all loaded after %.0fs; going on, the rest follow", LOAD_TIMEOUT_S)

    async def stop(self) -> None:
        await self._watch.stop()

    def _on_change(self, task_id: str, value: bytes | None) -> None:
        if value is None:
            self.ids.pop(task_id, None)  # deleted, or expired after cancel_ttl_s
            return
        try:
            reason = _decode_record(value).reason
        except msgspec.DecodeError:
            reason = ""
        self.add(task_id, reason)

    def add(self, task_id: str, reason: str) -> None:
        """Remember ``task_id`` as cancelled (forgetting the oldest past ``limit``) and tell ``on_cancel``."""
        if task_id in self.ids:
            return
        self.ids[task_id] = reason
        if len(self.ids) > self.limit:
            del self.ids[next(iter(self.ids))]
        if self.on_cancel is not None and self._watch.loaded:
            self.on_cancel(task_id, reason)
