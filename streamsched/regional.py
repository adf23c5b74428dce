"""The regional scheduler: releases one region's tasks from SCHED onto WORK, highest priority first.

It reads ``sched.<region>.<priority>`` through one durable consumer per priority with a
:class:`~streamsched.bus.Puller`, so a high task never waits behind a low backlog and
lower levels keep a small share. Each task is republished byte for byte to
``work.<region>.<priority>`` (routing data stays in the headers) with a ``dispatched``
event (on ``events.regional``), and acked on SCHED only when both landed.

Backpressure: the puller holds at most ``regional_window`` un-acked tasks; when WORK
refuses publishes (stream limits) they are nak'ed and come back, so the backlog waits
durably in SCHED. Any number of regional schedulers can serve one region.
"""

from __future__ import annotations

import logging
import time

from . import events as ev
from . import subjects, wire
from .bus import Bus, term_with_reason
from .config import Settings
from .pull import Puller, Settler
from .wire import Delivery

log = logging.getLogger("streamsched.regional")


class Regional:
    """Moves one region's tasks from SCHED to WORK."""

    def __init__(self, settings: Settings, bus: Bus, region: str) -> None:
        self.settings = settings
        self.bus = bus
        self.region = region
        self.priorities = settings.priorities
        self.work_subjects = [subjects.work(region, p) for p in self.priorities]
        consumers = [subjects.sched_consumer(region, p) for p in self.priorities]
        self.puller = Puller(bus, subjects.SCHED_STREAM, consumers, settings.regional_window, self._on_message)
        self.settler = Settler(bus, self.puller, source="regional")
        self.released = 0

    async def run(self) -> None:
        log.info("regional scheduler for region %s", self.region)
        await self.puller.run()
        await self.puller.finish()

    async def shutdown(self) -> None:
        self.puller.stop()

    def _on_message(self, level: int, msg: Delivery) -> None:
        # The header block goes on as it came, with the msg id of this hop: a quarter of
        # this role's CPU went into parsing it into a dict and encoding it again.
        raw = msg.raw_headers
        task_id = wire.header_value(raw, subjects.H_TASK_ID) if raw else None
        if task_id is None:  # not published by a master: nothing to route it by
            log.error("SCHED message without %s on %s; terminating it", subjects.H_TASK_ID, msg.subject)
            self.settler.settle(msg, term_with_reason("missing task id header"))
            return
        assert raw is not None
        headers = wire.with_header(raw, subjects.H_MSG_ID, subjects.msg_id(task_id, "work"))
        dispatched = ev.Dispatched(task_id=task_id, at=time.time(), region=self.region, priority=self.priorities[level])
        self.settler.forward(msg, [(self.work_subjects[level], msg.data, headers)], events=(dispatched,))
        self.released += 1
