"""Changing the priority of a task that has not started (``streamsched reprioritize``).

A request (:meth:`streamsched.client.Client.reprioritize`) is a JetStream publish on
``tasks.reprioritize``, read by a master's :class:`Reprioritizer` through the durable
``reprioritizer``, one request at a time across all masters. It

1. stores the *override* in KV ``priorities`` (task id -> priority and generation, the
   request's TASKS sequence, so a newer request wins and a redelivered one changes
   nothing) and records ``reprioritized``;
2. moves the task to its new level where it waits:

   * waiting for its dependencies: its record in KV ``waiting`` gets the new priority, so
     it is released there;
   * queued on WORK, not yet delivered: the WORK durable of its type and old priority is
     paused for the move (no delivery can slip in between), the task's message is found
     (batched direct gets from the durable's ack floor), a copy goes onto its new
     priority's subject (headers ``Streamsched-Priority`` and ``Streamsched-Generation``
     set, msg id ``<id>:work:g<generation>``), then the old message is deleted and the
     durable resumed. A crash between the copy and the delete leaves the old message, which
     the worker's rule below drops;
   * anywhere else (on SCHED, at a regional scheduler, already delivered to a worker that
     has not started it, or on a later redelivery): the worker moves it when it gets it.

*The worker's rule* (:class:`PriorityOverrides`, a mirror of KV ``priorities``): a task
whose override has a generation newer than the message's own is not run but moved: the
copy goes onto the new priority's subject with the override's generation and msg id, then
the message is acked; the copy carries the attempts its task had used
(``Streamsched-Attempts-Before``), since its own delivery count starts again. Two copies can never both run: every copy but the newest
generation's is moved, and all moves of one generation share one msg id, so the stream
keeps one. None is lost: a copy is published before the message it replaces is acked or
deleted. A task a worker started before the override reached it runs at its old priority.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
from nats.js.errors import NotFoundError

from .. import logs, subjects
from ..config import Settings
from ..eventlog import events as ev
from ..eventlog.state import StateStore
from ..model import Status, TaskState
from ..transport import direct, wire
from ..transport.bus import Bus, stored_at_ns, term_with_reason
from ..transport.kv_watch import BucketWatch
from ..transport.wire import Delivery
from .dependencies import Dependencies
from .durable_reader import DurableReader
from .placement import rfc3339

log = logging.getLogger("streamsched.reprioritize")

#: How long a request keeps looking for its task (not yet projected, or on its way to WORK).
LOCATE_FOR_S = 30.0
#: Longest a WORK durable is paused for a move (it resumes on its own after that).
PAUSE_S = 5.0
#: Messages read per direct get while looking for the task on WORK.
SCAN_BATCH = 256
#: Overrides a mirror keeps at most (the oldest forgotten first).
MAX_WATCHED = 100_000


class ReprioritizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The body of a message on ``tasks.reprioritize``."""

    id: str
    priority: str
    at: float = 0.0


class Override(msgspec.Struct, frozen=True, kw_only=True):
    """The value of KV ``priorities.<task id>``."""

    priority: str
    generation: int
    at: float = 0.0


_decode_request = msgspec.json.Decoder(ReprioritizeRequest).decode
_decode_override = msgspec.json.Decoder(Override).decode


class NotYetLocated(Exception):
    """The task is neither started nor found where it could be moved: the request comes back."""


def request_message(task_id: str, priority: str) -> tuple[str, bytes, dict[str, str]]:
    """``(subject, body, headers)`` of a request; its msg id makes a retried publish of this
    request harmless and a later request (even to the same priority) a new one."""
    at = time.time()
    body = msgspec.json.encode(ReprioritizeRequest(id=task_id, priority=priority, at=at))
    return subjects.REPRIORITIZE, body, {subjects.H_MSG_ID: subjects.msg_id(task_id, f"reprioritize-{priority}-{int(at * 1e6)}")}


def moved_headers(headers: bytes, task_id: str, priority: str, generation: int) -> bytes:
    """``headers`` of a task's message, as the copy on its new priority carries them."""
    headers = wire.with_header(headers, subjects.H_PRIORITY, priority)
    headers = wire.with_header(headers, subjects.H_GENERATION, str(generation))
    return wire.with_header(headers, subjects.H_MSG_ID, subjects.msg_id(task_id, f"work:g{generation}"))


class PriorityOverrides:
    """The overrides in KV ``priorities`` (task id -> :class:`Override`), kept current by a
    :class:`~streamsched.transport.kv_watch.BucketWatch`: the worker's per-task check is
    ``if overrides and task_id in overrides``."""

    def __init__(self, bus: Bus, *, limit: int = MAX_WATCHED) -> None:
        self.limit = limit
        self.overrides: dict[str, Override] = {}
        self._watch = BucketWatch(bus, subjects.PRIORITIES_BUCKET, self._on_change)

    async def start(self) -> None:
        if not await self._watch.start(5.0):
            log.warning("priority overrides not all loaded after 5s; going on, the rest follow")

    async def stop(self) -> None:
        await self._watch.stop()

    def _on_change(self, task_id: str, value: bytes | None) -> None:
        self.overrides.pop(task_id, None)
        if value is None:
            return
        try:
            self.overrides[task_id] = _decode_override(value)
        except msgspec.DecodeError as exc:
            log.warning("unreadable priority override of %s: %s", task_id, exc, extra=logs.task(task_id))
            return
        if len(self.overrides) > self.limit:
            del self.overrides[next(iter(self.overrides))]


class Reprioritizer(DurableReader):
    """A master's consumer of reprioritize requests."""

    def __init__(self, settings: Settings, bus: Bus, dependencies: Dependencies) -> None:
        super().__init__(settings, bus, subjects.TASKS_STREAM, subjects.REPRIORITIZER_CONSUMER, 1, source="reprioritizer")
        self.dependencies = dependencies
        self._tasks: StateStore | None = None
        self.moved = 0

    def _on_message(self, _level: int, msg: Delivery) -> None:
        try:
            request = _decode_request(msg.data)
        except msgspec.DecodeError as exc:
            log.error("unreadable reprioritize request (%s); terminating it", exc)
            self.settler.settle(msg, term_with_reason(f"unreadable reprioritize request: {exc}"))
            return
        if not subjects.is_token(request.id) or request.priority not in self.settings.priorities:
            log.error("reprioritize request for %r to %r: not a task id and priority; terminating it", request.id, request.priority)
            self.settler.settle(msg, term_with_reason("invalid task id or priority"))
            return
        stored_at = stored_at_ns(msg.reply) / 1e9  # the server's clock: a client's may be off
        self.settler.settle_after(msg, self._carry_out(request, msg.stream_seq, stored_at), f"reprioritizing {request.id}")

    async def _carry_out(self, request: ReprioritizeRequest, generation: int, stored_at: float) -> None:
        try:
            await self.reprioritize(request, generation)
        except NotYetLocated:
            if time.time() - stored_at < LOCATE_FOR_S:
                raise
            fields = logs.task(request.id)
            within = LOCATE_FOR_S
            log.warning("task %s not found where it could be moved within %.0fs; it moves when a worker gets it", request.id, within, extra=fields)

    async def reprioritize(self, request: ReprioritizeRequest, generation: int) -> None:
        """Carry out one request (``generation``: its TASKS sequence); safe to repeat."""
        if self._tasks is None:
            self._tasks = await StateStore.open(self.bus)
        found = await self._tasks.get(request.id)
        if found is None:
            raise NotYetLocated(f"no state of {request.id} yet")
        state = found[0]
        if state.status.is_final or state.status is Status.RUNNING:
            log.info("task %s is %s: its priority stays %s", request.id, state.status.value, state.priority, extra=logs.task(request.id))
            return
        if state.priority == request.priority:
            log.info("task %s is at %s already", request.id, request.priority, extra=logs.task(request.id))
            return
        if not await self._store(request, generation):
            return  # a newer request is in: it decides
        reprioritized = ev.Reprioritized(
            task_id=request.id,
            at=time.time(),
            attempt=state.attempts,
            region=state.region or "",
            priority=request.priority,
            previous=state.priority or "",
        )
        recorder = self.settler.recorder
        assert recorder is not None, "the reprioritizer's settler records events"
        await recorder.record((reprioritized,))
        if await self.dependencies.set_priority(request.id, request.priority, generation):
            return
        if not await self._move_on_work(state, request.priority, generation):
            raise NotYetLocated(f"task {request.id} is not on WORK yet")
        self.moved += 1

    async def _store(self, request: ReprioritizeRequest, generation: int) -> bool:
        """The override in KV ``priorities``, unless a newer one is there; False then."""
        kv = await self.bus.js.key_value(subjects.PRIORITIES_BUCKET)
        key = subjects.state_key(request.id)
        try:
            entry = await kv.get(key)
        except NotFoundError:
            entry = None
        if entry is not None and entry.value:
            current = _decode_override(entry.value)
            if current.generation > generation or (current.priority == request.priority and current.generation < generation):
                return False  # a newer request decides, or this one asks for what an earlier one did
        value = msgspec.json.encode(Override(priority=request.priority, generation=generation, at=request.at))
        if entry is None or entry.value is None:
            await kv.put(key, value)
        else:
            await kv.update(key, value, last=entry.revision)  # a concurrent writer makes this fail and the request come back
        return True

    async def _move_on_work(self, state: TaskState, priority: str, generation: int) -> bool:
        """Move the task's message on WORK to ``priority``; True when it is handled (moved, or
        in a worker's hands, where the worker's rule moves it), False when it is not there."""
        if state.region is None or state.priority is None or state.type is None:
            return False
        old = subjects.work(state.region, state.priority, state.type)
        durable = subjects.work_consumer(state.region, state.priority, state.type)
        js = self.bus.js
        paused = False
        delivered, floor = 0, 0
        try:
            info = await js.consumer_info(subjects.WORK_STREAM, durable)
            # Paused for longer than a move already (an open circuit breaker): that pause is not
            # this move's to lift.
            if not (info.paused and int(info.pause_remaining or 0) > PAUSE_S * 1e9):
                await js.pause_consumer(subjects.WORK_STREAM, durable, rfc3339(time.time() + PAUSE_S))
                paused = True
                info = await js.consumer_info(subjects.WORK_STREAM, durable)
            delivered, floor = info.delivered.stream_seq or 0, info.ack_floor.stream_seq or 0
            still = info.paused
        except NotFoundError:  # no worker made it yet: nothing can be delivered meanwhile
            still = True
        try:
            if not still:  # the pause did not hold (this host's clock far behind the server's): no move
                log.warning("WORK durable %s not paused for the move of %s; its worker moves it", durable, state.id)
                return True
            message = await self._find(old, state.id, floor + 1)
            if message is None:
                return False
            if message.seq <= delivered:
                return True  # delivered: its worker moves it when it gets to it (or runs it, if it started already)
            new = subjects.work(state.region, priority, state.type)
            await (await self.bus.publish(new, message.data, moved_headers(message.headers, state.id, priority, generation)))
            await js.delete_msg(subjects.WORK_STREAM, message.seq)
            log.info("moved %s from %s to %s (WORK seq %d)", state.id, state.priority, priority, message.seq)
            return True
        finally:
            if paused:
                await js.resume_consumer(subjects.WORK_STREAM, durable)

    async def _find(self, subject: str, task_id: str, start: int) -> Any:
        """The message of ``task_id`` on ``subject`` from stream sequence ``start``, or None."""
        while True:
            found = await direct.next_on_subject(self.bus, subjects.WORK_STREAM, subject, start, SCAN_BATCH)
            for message in found:
                if wire.header_value(message.headers, subjects.H_TASK_ID) == task_id:
                    return message
            if len(found) < SCAN_BATCH:
                return None
            start = found[-1].seq + 1
