"""The resolver: each master's consumer of the tasks the projector wrote final, which
releases or cancels what waits for them (:mod:`streamsched.roles.dependencies`).

After a write batch has landed, the projector publishes one notice on ``finished``
(stream FINISHED, a work queue): the tasks the batch made final, with their status. It
acks the batch's event messages only once the notice is stored, so a crash in between
publishes it again. Every master reads the notices through the shared durable
``resolver`` and resolves them (edges, records, releases), acking a notice once its
resolution landed. Every step is idempotent, so a notice resolved twice changes nothing.

The notice comes after the final state is written, and the edges are looked up after
the notice: the order the race-freeness of registration rests on.

Why the masters resolve, not the projector itself: the projector runs at a lower CPU
priority (its work can wait while the pipeline's cannot), and a release is on the path of
the task it releases. Resolved by a master, a dependant starts 4-5 ms sooner at 250 tasks/s.
"""

from __future__ import annotations

import asyncio
import logging

import anyio
import msgspec

from .. import subjects
from ..model import Status
from ..transport.bus import ACK, Bus, nak_with_delay
from ..transport.pull import Puller
from ..transport.streams import RESOLVER_WINDOW
from ..transport.wire import Delivery
from .dependencies import Dependencies
from .settle import Settler

log = logging.getLogger("streamsched.resolver")

#: Seconds before a notice whose resolution failed (JetStream unavailable) comes back.
RETRY_DELAY_S = 1.0

#: The body of a notice: each task the batch made final, with its status.
Notice = dict[str, Status]
_decode_notice = msgspec.json.Decoder(Notice).decode
encode_notice = msgspec.json.Encoder().encode


class Resolver:
    """A master's part of resolving dependencies: the notices, and the dependency timeouts."""

    def __init__(self, bus: Bus, dependencies: Dependencies) -> None:
        self.bus = bus
        self.dependencies = dependencies
        self.puller = Puller(bus, subjects.FINISHED_STREAM, [subjects.RESOLVER_CONSUMER], RESOLVER_WINDOW, self._on_message)
        self.settler = Settler(bus, self.puller)
        self._running: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.dependencies.run_timeouts)
            await self.puller.run()
            await self.puller.finish()
            self.dependencies.stop()

    async def shutdown(self) -> None:
        self.puller.stop()

    def _on_message(self, _level: int, msg: Delivery) -> None:
        try:
            notice = _decode_notice(msg.data)
        except msgspec.DecodeError as exc:
            log.error("unreadable notice of finished tasks (seq %d): %s; dropping it", msg.stream_seq, exc)
            self.settler.settle(msg, ACK)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(msg, notice))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _resolve(self, msg: Delivery, notice: Notice) -> None:
        try:
            await self.dependencies.resolve(notice)
        except Exception as exc:  # noqa: BLE001 - JetStream failed a step: the notice comes back
            log.warning("resolving the dependants of %d finished task(s) failed (%r); again in %.1fs", len(notice), exc, RETRY_DELAY_S)
            self.settler.settle(msg, nak_with_delay(RETRY_DELAY_S))
            return
        self.settler.settle(msg, ACK)
