"""What TIMERS fires: delayed tasks whose time has come, and cron slots.

nats-server holds the time (JetStream message schedules, see :mod:`streamsched.roles.placement`
and :mod:`streamsched.roles.schedules`) and, when it comes, stores a copy of the
schedule's message on ``timers.due``. Every master reads that subject through the shared
durable ``master-timers`` (so any number of masters split the firings, and a firing
stored while no master runs waits there) and settles each firing publish-before-ack:

* a delayed task (fired from ``timers.at.<id>``) carries its SCHED headers and body: it
  goes to ``sched.<region>.<priority>`` (``Nats-Msg-Id: <id>:sched:0``) with a
  ``scheduled`` event;
* a cron slot (fired from ``timers.cron.<name>``) carries the schedule's task template:
  it becomes a new submission on ``tasks.submit.<priority>`` (its template's priority, so
  it passes lower submissions waiting for the master) under an id made of the schedule's name
  and the slot's time, which is also its ``Nats-Msg-Id``, so a redelivered firing makes
  no second task.
"""

from __future__ import annotations

import logging
import time

from .. import subjects, tracing
from ..config import Settings
from ..eventlog import events as ev
from ..transport import streams, wire
from ..transport.bus import ACK, Bus, stored_at_ns
from ..transport.wire import Delivery
from .durable_reader import DurableReader
from .schedules import slot_submission

log = logging.getLogger("streamsched.timers")


class Timers(DurableReader):
    """Consumes ``timers.due`` through the durable ``master-timers``; runs inside each master."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        super().__init__(settings, bus, subjects.TIMERS_STREAM, subjects.TIMERS_CONSUMER, streams.TIMERS_WINDOW, source="timers")

    def _on_message(self, _level: int, msg: Delivery) -> None:
        headers = wire.parse_headers(msg.raw_headers) if msg.raw_headers else {}
        name = headers.get(subjects.H_SCHEDULE)
        if name is not None:
            self._cron_slot(msg, name, stored_at_ns(msg.reply) / 1e9)
        elif subjects.H_TASK_ID in headers:
            self._delayed(msg, headers)
        else:
            log.error("a message on %s that is neither a delayed task nor a cron slot (%s); dropping it", msg.subject, headers)
            self.settler.settle(msg, ACK)

    def _delayed(self, msg: Delivery, headers: dict[str, str]) -> None:
        task_id = headers[subjects.H_TASK_ID]
        region = headers.get(subjects.H_REGION, "")
        priority = headers.get(subjects.H_PRIORITY, "")
        trace = headers.get(tracing.TRACEPARENT, "")  # the master's span, which the block carries on
        scheduled = ev.Scheduled(task_id=task_id, at=time.time(), region=region, priority=priority, trace=trace)
        block = sched_block(msg.raw_headers or b"", task_id)
        self.settler.forward(msg, [(subjects.sched(region, priority), msg.data, block)], events=(scheduled,))

    def _cron_slot(self, msg: Delivery, name: str, fired_at: float) -> None:
        made = slot_submission(name, msg.data, fired_at)
        if made is None:
            log.error("cron schedule %s fired a template that is not a task; dropping the slot", name)
            self.settler.settle(msg, ACK)
            return
        task_id, priority, body = made
        self.settler.forward(msg, [(subjects.submit_for(priority, self.settings.priorities), body, {subjects.H_MSG_ID: task_id})])


def sched_block(fired: bytes, task_id: str) -> bytes:
    """The SCHED header block of a fired delayed task: its own headers as placed, without
    what nats-server added (``Nats-Schedule*``, ``Nats-Scheduler``…), with the SCHED
    hop's ``Nats-Msg-Id``."""
    kept = [line for line in fired.split(b"\r\n")[1:] if line and not line.startswith(b"Nats-")]
    msg_id = b"%s: %s" % (subjects.H_MSG_ID.encode(), subjects.msg_id(task_id, "sched").encode())
    return b"NATS/1.0\r\n" + b"".join(line + b"\r\n" for line in (msg_id, *kept)) + b"\r\n"
