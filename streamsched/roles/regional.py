"""The regional scheduler: releases one region's tasks from SCHED onto WORK, highest priority first.

It reads ``sched.<region>.<priority>`` through one durable consumer per priority with a
:class:`~streamsched.transport.pull.Puller`, so a high task never waits behind a low backlog and
lower levels keep a small share. A SCHED message holds one task or a batch of them
(:mod:`streamsched.roles.sched_batches`). Each task is republished byte for byte to
``work.<region>.<priority>.<type>`` as its own message, where only workers with a handler
for its type fetch it (routing data stays in the headers, with
the msg id ``<task>:work:0`` that makes a second copy harmless) with a ``dispatched``
event (on ``events.regional``), and the SCHED message is acked only when all of them landed.
When no live worker of the region handles the task's type (:class:`~streamsched.roles.worker_registry.LiveWorkers`,
a mirror of KV ``workers``), the task still goes onto WORK, where it waits for one, and
its event is ``held``, with that reason, in place of ``dispatched``.
A cancelled task (:mod:`streamsched.roles.cancels`) is not released: it gets a ``cancelled``
event instead, and leaves SCHED with the ack.

Backpressure: the puller holds at most ``regional_window`` tasks (a 64th of that in
messages, since a batch holds up to 64); when WORK
refuses publishes (stream limits) they are nak'ed and come back, so the backlog waits
durably in SCHED. Any number of regional schedulers can serve one region.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec

from .. import logs, subjects, tracing
from ..config import Settings
from ..eventlog import events as ev
from ..transport import streams, wire
from ..transport.bus import Bus, term_with_reason
from ..transport.pull import Puller
from ..transport.wire import Delivery
from . import limits, sched_batches
from .admission import Admission
from .cancels import CancelWatch
from .region_registry import RegionPresence
from .settle import Publication, Settler
from .worker_registry import LiveWorkers

log = logging.getLogger("streamsched.regional")


class Regional:
    """Moves one region's tasks from SCHED to WORK."""

    def __init__(self, settings: Settings, bus: Bus, region: str) -> None:
        self.settings = settings
        self.bus = bus
        self.region = region
        self.priorities = settings.priorities
        consumers = [subjects.sched_consumer(region, p) for p in self.priorities]
        window = streams.sched_window_messages(settings.regional_window, len(self.priorities))
        self.puller = Puller(bus, subjects.SCHED_STREAM, consumers, window, self._on_message)
        self.settler = Settler(bus, self.puller, source="regional", partitions=settings.projector_partitions)
        self.cancels = CancelWatch(bus)
        self.workers = LiveWorkers(bus)
        self.ready = anyio.Event()
        """Set once it knows the cancelled tasks and the live workers, as it starts releasing."""
        self.presence = RegionPresence(bus, settings, region, self.workers)  # its entry in KV regions: alive, and the region's headroom
        assert self.settler.recorder is not None
        self.admission = Admission(settings, bus, self.settler.recorder, self.cancels, self.workers)
        self.rate_limited = settings.rate_limits  # task types and rate keys with a rate limit
        self._lanes: dict[tuple[str, str | None], tuple[str, str]] = {}  # (type, limits header) -> (lane, reason)
        self.released = 0

    async def run(self) -> None:
        log.info("regional scheduler for region %s", self.region)
        await self.cancels.start()
        await self.workers.start()
        self.ready.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.presence.run)
                tg.start_soon(self.admission.run)
                await self.puller.run()
                await self.puller.finish()
                self.presence.shutdown()
                self.admission.shutdown()
        finally:
            await self.cancels.stop()
            await self.workers.stop()

    async def shutdown(self) -> None:
        self.puller.stop()
        self.presence.shutdown()
        self.admission.shutdown()

    def _on_message(self, level: int, msg: Delivery) -> None:
        raw = msg.raw_headers
        if raw and wire.header_value(raw, subjects.H_BATCH) is not None:
            try:
                entries = sched_batches.decode(msg.data)
            except msgspec.DecodeError as exc:
                log.error("unreadable SCHED batch on %s (%s); terminating it", msg.subject, exc)
                self.settler.settle(msg, term_with_reason(f"unreadable batch: {exc}"))
                return
        else:
            entries = [(raw or b"", msg.data)]
        priority, now = self.priorities[level], time.time()
        publications: list[Publication] = []
        dispatched: list[ev.Event] = []
        cancelled = self.cancels.ids
        handled = self.workers.handled(self.region)
        parked = False
        traced = tracing.ENABLED
        for headers, data in entries:
            task_id = wire.header_value(headers, subjects.H_TASK_ID) if headers else None
            if task_id is None or not subjects.is_token(task_id):
                # Not published by a master: nothing to route it by (TASKS keeps the submission).
                log.error("SCHED task without a valid %s (%r) on %s (seq %d); dropping it", subjects.H_TASK_ID, task_id, msg.subject, msg.stream_seq)
                continue
            if cancelled and task_id in cancelled:
                dispatched.append(ev.Cancelled(task_id=task_id, at=now, region=self.region, reason=cancelled[task_id]))
                continue
            task_type = wire.header_value(headers, subjects.H_TYPE)
            # A type a live worker handles is valid (its handler's name was checked); the rest are
            # checked here, since a master sends only valid types but not all SCHED is a master's.
            if task_type is None or (task_type not in handled and not subjects.is_type(task_type)):
                fields = logs.task(task_id, task_type or "")
                log.error("SCHED task %s without a valid %s (%r) on %s; failing it", task_id, subjects.H_TYPE, task_type, msg.subject, extra=fields)
                error = f"type {task_type!r} cannot be routed to a worker (not dotted words of A-Z a-z 0-9 _ - : /)"
                dispatched.append(ev.Failed(task_id=task_id, at=now, region=self.region, error=error))
                continue
            trace = ""
            if traced:  # this hop's span, a child of the master's, rides on in place of it
                attributes = tracing.task_attributes(task_id, task_type, region=self.region)
                trace = tracing.hop("regional", wire.header_value(headers, tracing.TRACEPARENT) or "", attributes)
                headers = wire.with_header(headers, tracing.TRACEPARENT, trace)
            limited = wire.header_value(headers, subjects.H_LIMITS)
            if limited is not None or (self.rate_limited and task_type in self.rate_limited):
                # Under a concurrency key, rate limit or fair share: parked in its lane until admitted.
                lane, reason = self._lane(task_type, limited)
                parked_headers = wire.with_header(headers, subjects.H_MSG_ID, subjects.msg_id(task_id, "held"))
                publications.append((subjects.held(priority, lane), data, parked_headers))
                dispatched.append(ev.Held(task_id=task_id, at=now, region=self.region, priority=priority, reason=reason, trace=trace))
                parked = True
                continue
            # The header block goes on as it came, with the msg id of this hop: a quarter of
            # this role's CPU went into parsing it into a dict and encoding it again.
            work_subject = subjects.work(self.region, priority, task_type)
            publications.append((work_subject, data, wire.with_header(headers, subjects.H_MSG_ID, subjects.msg_id(task_id, "work"))))
            if task_type in handled:
                dispatched.append(ev.Dispatched(task_id=task_id, at=now, region=self.region, priority=priority, trace=trace))
            else:  # it waits on WORK, visibly, until a worker that handles its type starts
                reason = f"no worker for type {task_type} in region {self.region}"
                dispatched.append(ev.Held(task_id=task_id, at=now, region=self.region, priority=priority, reason=reason, trace=trace))
        if not dispatched:
            self.settler.settle(msg, term_with_reason("missing task id header"))
            return
        self.settler.forward(msg, publications, events=dispatched, settled=self._parked if parked else None)
        self.released += len(publications)

    def _parked(self) -> None:
        """A message whose tasks include parked ones was settled: they are in their lanes, admit them."""
        self.puller.release()
        self.admission.wake()

    def _lane(self, task_type: str, limited: str | None) -> tuple[str, str]:
        """The lane of a task of ``task_type`` under the limits ``limited``, and what it waits for there."""
        found = self._lanes.get((task_type, limited))
        if found is None:
            gates = limits.gates(self.settings, task_type, limited)
            reason = gates.reason if gates is not None else "waiting for admission"
            if len(self._lanes) > 10_000:
                self._lanes.clear()
            found = self._lanes[task_type, limited] = (limits.lane(self.region, task_type, limited), reason)
        return found
