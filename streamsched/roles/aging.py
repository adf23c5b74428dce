"""Priority aging (``aging_s``): a task queued on WORK rises one level each time it has waited
``aging_s``, so a steady flood of higher tasks cannot hold it back without bound.

Each master runs an :class:`Ager` when ``aging_s`` is set. Every ``aging_s / 2`` it asks
WORK for its subjects with their message counts (one request) and, for each of a level
below the highest that holds tasks, reads the oldest messages its durable has not delivered
yet (batched direct gets, at most
:data:`PER_PASS`): each stored longer ago than ``aging_s`` gets a reprioritize request one
level up (:mod:`streamsched.roles.reprioritize` moves it, and a worker moves any copy it
gets first). The request's msg id names the task and its new level, so the masters, each
aging the same tasks, send each move once, and a task rises again only after it has
waited ``aging_s`` at its new level (its copy there is stored anew).
"""

from __future__ import annotations

import logging
import time

import anyio
from nats.js.errors import NotFoundError

from .. import subjects
from ..config import Settings
from ..transport import direct, wire
from ..transport.bus import Bus
from .reprioritize import request_message

log = logging.getLogger("streamsched.aging")

#: Tasks one durable's subject is read for at most per pass (the oldest).
PER_PASS = 64


class Ager:
    """A master's aging loop (see the module)."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.aged = 0
        self._stopped = anyio.Event()

    async def run(self) -> None:
        interval = max(0.05, self.settings.aging_s / 2)
        while not self._stopped.is_set():
            try:
                await self.age()
            except Exception as exc:  # noqa: BLE001 - slow or disconnected: the next pass tries again
                log.warning("aging pass failed (%r); trying again in %.1fs", exc, interval)
            with anyio.move_on_after(interval):
                await self._stopped.wait()

    async def shutdown(self) -> None:
        self._stopped.set()

    async def _undelivered_from(self, parsed: tuple[str, str, str]) -> int:
        """The first stream sequence its durable has not delivered yet (1 without a durable):
        tasks in workers' hands are not waiting, and are not read."""
        try:
            info = await self.bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(*parsed))
        except NotFoundError:
            return 1
        return (info.delivered.stream_seq or 0) + 1

    async def age(self) -> int:
        """One pass; the number of reprioritize requests sent."""
        priorities = self.settings.priorities
        cutoff = time.time() - self.settings.aging_s
        sent = 0
        info = await self.bus.js.stream_info(subjects.WORK_STREAM, subjects_filter=subjects.WORK_ALL)
        for subject, count in (info.state.subjects or {}).items():
            parsed = subjects.parse_work(subject)
            if parsed is None or count == 0:
                continue
            region, priority, _ = parsed
            if priority not in priorities[1:] or region not in self.settings.regions:
                continue
            higher = priorities[priorities.index(priority) - 1]
            oldest = await direct.next_on_subject(self.bus, subjects.WORK_STREAM, subject, await self._undelivered_from(parsed), PER_PASS)
            for message in oldest:
                if message.stored_at > cutoff:
                    break  # in stream order: the rest waited less
                task_id = wire.header_value(message.headers, subjects.H_TASK_ID)
                if task_id is None or not subjects.is_token(task_id):
                    continue
                subject, body, headers = request_message(task_id, higher)
                headers[subjects.H_MSG_ID] = subjects.msg_id(task_id, f"age-{higher}-{message.seq}")
                await (await self.bus.publish(subject, body, headers))
                sent += 1
        self.aged += sent
        return sent
