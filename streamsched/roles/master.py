"""The master scheduler: validates submissions from ``tasks.submit`` and routes them to regions.

Submissions arrive on plain ``tasks.submit`` (the priority in the body, default medium) or
on ``tasks.submit.<priority>``, each subject read through its own durable consumer
(:func:`ingress_levels`). The master drains them highest first with the credit puller, so
a high task published behind a burst of low ones overtakes the burst at the door instead
of waiting in TASKS until the master has read every low one. On ``tasks.submit.<p>`` a
task whose body names no priority gets ``<p>`` (and is handed on with it written in its
body); one whose body names another priority is rejected, since the submitter said two
different things and either choice would run it against half of what they meant. A
workflow or a batch there is held to the same rule task by task. A subject of a priority
that is not configured is not taken by TASKS at all (see :mod:`streamsched.transport.streams`).

For each submission it either

* accepts it: picks an id (the submitter's, or one derived from the message's place in
  TASKS so a redelivery gets the same one), a region (the task's own, or a healthy one with
  room: :mod:`streamsched.roles.routing`; a redelivery where its first copy went) and a
  priority, hands the original bytes to ``sched.<region>.<priority>`` with routing data
  in headers (in one message
  with the other tasks of the loop tick for that subject, :mod:`streamsched.roles.sched_batches`),
  and records ``submitted`` and ``scheduled`` events (on ``events.master``, with those of
  the other submissions it handled in the same loop tick); or
* rejects it: publishes the original bytes to ``tasks.rejected`` with the reason, and a
  ``rejected`` event.

Only when those publishes are acknowledged is the submission acked, so a crash at any
point redelivers it, and ``Nats-Msg-Id`` dedupe drops the task if it had already gone
through: at SCHED for a task handed over alone, at WORK for one that went in a batch
(its events are recorded again: see :mod:`streamsched.eventlog.recorder`).
Any number of masters can share the durable consumer. Each master also runs a
:class:`~streamsched.roles.cancels.Canceller`, which takes the cancel requests on ``tasks.cancel``,
and a :class:`~streamsched.roles.breaker_keeper.BreakerKeeper` (circuit breakers per task type).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import anyio
import msgspec

from .. import logs, subjects, tracing
from ..config import Settings
from ..errors import Rejected
from ..eventlog import events as ev
from ..model import (
    DEFAULT_PRIORITY,
    Envelope,
    Submission,
    decode_submission,
    derive_task_id,
)
from ..transport import wire
from ..transport.bus import Bus, nak_with_delay, stored_at_ns
from ..transport.pull import Puller
from ..transport.wire import Delivery
from . import limits
from .aging import Ager
from .breaker_keeper import BreakerKeeper
from .cancels import Canceller
from .checks import check_fields
from .intake import Intake, decode_wrapper, needs_intake
from .placement import sched_headers
from .reprioritize import Reprioritizer
from .resolver import Resolver
from .routing import Router
from .sched_batches import TaskBatcher
from .settle import Settler
from .timers import Timers
from .timing import deadline_at

log = logging.getLogger("streamsched.master")


def ingress_levels(settings: Settings) -> list[tuple[str, str | None]]:
    """The master's consumers on TASKS in the order it drains them, each with the priority
    its subject names (``None``: plain ``tasks.submit``, whose bodies name their own).

    ``tasks.submit.<priority>`` come highest first. Plain ``tasks.submit`` comes right after
    the default priority's subject: what arrives there mostly names no priority, so it is of
    the default one, and a priority a body names is known only once the master has read it
    (too late to pass anything at the door). It comes after that subject and not before,
    since a submission there is known to be of the default priority while a plain one may be
    of a lower one. Without the default among the priorities (a plain submission must then
    name one) it comes last.
    """
    levels: list[tuple[str, str | None]] = []
    for priority in settings.priorities:
        levels.append((subjects.master_consumer(priority), priority))
        if priority == DEFAULT_PRIORITY:
            levels.append((subjects.MASTER_CONSUMER, None))
    if DEFAULT_PRIORITY not in settings.priorities:
        levels.append((subjects.MASTER_CONSUMER, None))
    return levels


class _NamedPriority(msgspec.Struct, gc=False):
    priority: str | None = None


_named_priority_decoder = msgspec.json.Decoder(_NamedPriority)


def with_subject_priority(submission: Submission, data: bytes, priority: str) -> Submission:
    """``submission`` (decoded from ``data``) as taken in on ``tasks.submit.<priority>``, when
    its decoded priority is another: it names none (the decoder filled in the default), so it
    gets ``priority``; raises :class:`Rejected` when it names another itself."""
    named = _named_priority_decoder.decode(data).priority
    if named is not None:
        subject = subjects.submit(priority)
        raise Rejected(f"priority {named!r} in the body does not match subject {subject} (priority {priority!r}): name one, or the same in both")
    return msgspec.structs.replace(submission, priority=priority)


class Master:
    """Consumes TASKS through the durables ``master`` and ``master-<priority>`` and publishes to SCHED."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        levels = ingress_levels(settings)
        #: The priority the subject of each puller level names (``None``: plain ``tasks.submit``).
        self.subject_priorities = tuple(priority for _, priority in levels)
        self.puller = Puller(bus, subjects.TASKS_STREAM, [name for name, _ in levels], settings.master_window, self._on_message)
        self.settler = Settler(bus, self.puller, source="master", partitions=settings.projector_partitions, batcher=TaskBatcher(bus))
        self.intake = Intake(settings, bus, self.settler, self._reject, self)
        self.canceller = Canceller(settings, bus)
        self.reprioritizer = Reprioritizer(settings, bus, self.canceller.dependencies)
        self.ager = Ager(settings, bus) if settings.aging_s else None
        self.breakers = BreakerKeeper(settings, bus)
        self.timers = Timers(settings, bus)
        self.resolver = Resolver(bus, self.intake.dependencies)
        self.router = Router(settings, bus)
        self.accepted = 0
        self.rejected = 0

    async def run(self) -> None:
        log.info("master routing to regions %s", ", ".join(self.settings.regions))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.canceller.run)
            tg.start_soon(self.reprioritizer.run)
            if self.ager is not None:
                tg.start_soon(self.ager.run)
            tg.start_soon(self.breakers.run)
            tg.start_soon(self.timers.run)
            tg.start_soon(self.resolver.run)
            tg.start_soon(self.router.run)
            await self.puller.run()
            await self.puller.finish()

    async def shutdown(self) -> None:
        self.puller.stop()
        await self.canceller.shutdown()
        await self.reprioritizer.shutdown()
        if self.ager is not None:
            await self.ager.shutdown()
        await self.breakers.shutdown()
        await self.timers.shutdown()
        await self.resolver.shutdown()
        self.router.shutdown()

    def validate(self, data: bytes, task_id_if_missing: Callable[[], str], priority: str | None = None) -> Submission:
        """The decoded submission, with its id filled in; raises :class:`Rejected` with a reason.

        It is decoded as the worker will decode it (:func:`~streamsched.model.decode_submission`),
        so an accepted task never fails there for its bytes. The rejection carries the
        submitter's id when it is usable (``Rejected.task_id``), so they can look up why;
        otherwise the id derived from the message. ``priority``: the one its subject names
        (``tasks.submit.<priority>``), see :func:`with_subject_priority`.
        """
        return self._validated(data, task_id_if_missing, priority)[0]

    def _validated(self, data: bytes, task_id_if_missing: Callable[[], str], priority: str | None) -> tuple[Submission, bytes]:
        """:meth:`validate`, and the bytes to hand on: ``data``, or the submission encoded
        when it got its subject's priority, so that its body names it (what the worker, a
        dead-letter entry and a re-drive read)."""
        submission = decode_submission(data, max_bytes=self.settings.max_payload_bytes)
        given = priority is None or submission.priority == priority  # the common case: the body names it
        try:
            if not given:
                assert priority is not None
                submission = with_subject_priority(submission, data, priority)
            self._check(submission)
        except Rejected as exc:
            if submission.id is not None and subjects.is_token(submission.id):
                exc.task_id = submission.id
            raise
        if submission.id is None:
            submission = msgspec.structs.replace(submission, id=task_id_if_missing())
        return submission, (data if given else msgspec.json.encode(submission))

    def _check(self, envelope: Envelope) -> None:
        check_fields(envelope, self.settings)

    def pick_region(self, task_id: str) -> str:
        """The region of a task that names none: a healthy one with room (:mod:`streamsched.roles.routing`)."""
        return self.router.pick(task_id)

    async def recorded_regions(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Where the tasks of a redelivered submission went the first time (those whose state says)."""
        return await self.router.recorded_regions(task_ids) if self.router.moves else {}

    def _on_message(self, level: int, msg: Delivery) -> None:
        def fallback_id() -> str:  # only for submissions without a usable id: not per message
            # The TASKS sequence is unique across the ingress subjects, so ids stay unique too.
            return derive_task_id(stored_at_ns(msg.reply), msg.stream_seq)

        now = time.time()
        priority = self.subject_priorities[level]
        # The submitter's trace context ("" starts a trace here); None: tracing is off.
        parent = (wire.header_value(msg.raw_headers or b"", tracing.TRACEPARENT) or "") if tracing.ENABLED else None
        try:
            envelope, body = self._validated(msg.data, fallback_id, priority)
        except Rejected as exc:
            wrapper = decode_wrapper(msg.data)
            if wrapper is not None:  # a workflow or a batch: many tasks in one message
                self.intake.accept_wrapper(msg, wrapper, fallback_id(), now, priority, parent)
            else:
                self._reject(msg, exc.task_id or fallback_id(), str(exc), now)
            return
        if msg.num_delivered > 1 and self.router.moves:
            self._route_again(msg, envelope, body, now, parent)
            return
        if needs_intake(envelope):
            assert envelope.id is not None
            self.intake.accept(msg, envelope, envelope.region or self.pick_region(envelope.id), now, parent)
            return
        self._route(msg, envelope, body, now, None, parent)

    def _route_again(self, msg: Delivery, envelope: Submission, body: bytes, now: float, parent: str | None) -> None:
        """A redelivered submission goes where its first copy went, whatever the routing table
        says now: two copies in two regions are not always caught by the dedupe."""
        assert envelope.id is not None

        def then(recorded: str | None) -> None:
            if needs_intake(envelope):
                self.intake.accept(msg, envelope, recorded or envelope.region or self.pick_region(envelope.id or ""), now, parent)
            else:
                self._route(msg, envelope, body, now, recorded, parent)

        def failed(exc: BaseException) -> None:
            delay, fields = self.settler.retry_delay_s, logs.task(envelope.id or "", envelope.type)
            log.warning("state of redelivered task %s not read (%r); it comes back in %.1fs", envelope.id, exc, delay, extra=fields)
            self.settler.settle(msg, nak_with_delay(self.settler.retry_delay_s))

        self.router.after_lookup(envelope.id, then, failed)

    def _route(self, msg: Delivery, envelope: Envelope, body: bytes, now: float, recorded: str | None = None, parent: str | None = None) -> None:
        """Hand the task to SCHED (``recorded``: the region its first copy went to, for a
        redelivery; ``parent``: the trace context it came with, None while tracing is off)."""
        task_id = envelope.id
        assert task_id is not None
        region = recorded or envelope.region
        note = None
        if region is None:
            region = self.router.pick(task_id)
        elif self.router.unhealthy and recorded is None:
            region, note = self.router.pinned(task_id, region, envelope.region_failover, now)
        priority = envelope.priority
        deadline = None
        if envelope.deadline is not None or envelope.deadline_s is not None:  # read only when set
            deadline = deadline_at(envelope, stored_at_ns(msg.reply) / 1e9)
        trace = "" if parent is None else tracing.hop("master", parent, tracing.task_attributes(task_id, envelope.type, region=region))
        headers = sched_headers(
            task_id,
            envelope.type,
            priority,
            region,
            max_attempts=envelope.max_attempts,
            timeout_s=envelope.timeout_s,
            deadline_at=deadline,
            limits=limits.header_value(envelope),
            trace=trace,
        )
        submitted = ev.Submitted(task_id=task_id, at=now, type=envelope.type, priority=priority, region=region, labels=envelope.labels, trace=trace)
        scheduled = ev.Scheduled(task_id=task_id, at=now, region=region, priority=priority, trace=trace)
        events = (submitted, scheduled) if note is None else (submitted, scheduled, note)
        self.settler.forward(msg, (), events=events, handoff=(subjects.sched(region, priority), body, headers))
        self.accepted += 1

    def _reject(self, msg: Delivery, task_id: str, reason: str, now: float) -> None:
        log.warning("rejected submission %s: %s", task_id, reason, extra=logs.task(task_id))
        headers = {
            subjects.H_MSG_ID: subjects.msg_id(task_id, "rejected"),
            subjects.H_TASK_ID: task_id,
            subjects.H_REASON: " ".join(reason.split())[:1024],  # one line: it is a header
        }
        rejected = ev.Rejected(task_id=task_id, at=now, reason=reason, original=msg.data)
        self.settler.forward(msg, [(subjects.REJECTED, msg.data, headers)], events=(rejected,))
        self.rejected += 1
