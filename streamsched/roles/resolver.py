"""The resolver: each master's consumer of the tasks the projector wrote final, which
releases or cancels what waits for them (:mod:`streamsched.roles.dependencies`).

After a write batch has landed, the projector publishes one notice on ``finished``
(stream FINISHED, a work queue): the tasks the batch made final, with their status. It
acks the batch's event messages only once the notice is stored, so a crash in between
publishes it again. Every master reads the notices through the shared durable
``resolver`` and resolves them (edges, records, releases), acking a notice once its
resolution landed. Every step is idempotent, so a notice resolved twice changes nothing.
The masters also read the dependency timeouts that fired (``timers.deps-due``, durable
``deps-timeouts``) and cancel the tasks still waiting.

The notice comes after the final state is written, and the edges are looked up after
the notice: the order the race-freeness of registration rests on.

Why the masters resolve, not the projector itself: the projector runs at a lower CPU
priority (its work can wait while the pipeline's cannot), and a release is on the path of
the task it releases.
"""

from __future__ import annotations

import logging

import anyio
import msgspec

from .. import subjects
from ..model import Status
from ..transport.bus import ACK, Bus
from ..transport.pull import Puller
from ..transport.streams import DEPS_TIMEOUT_WINDOW, RESOLVER_WINDOW
from ..transport.wire import Delivery
from .dependencies import Dependencies
from .settle import Settler

log = logging.getLogger("streamsched.resolver")

#: The body of a notice: each task the batch made final, with its status.
Notice = dict[str, Status]
_decode_notice = msgspec.json.Decoder(Notice).decode
encode_notice = msgspec.json.Encoder().encode


class Resolver:
    """A master's part of resolving dependencies: the notices, and the dependency timeouts
    that fired (``timers.deps-due``, through the shared durable ``deps-timeouts``)."""

    def __init__(self, bus: Bus, dependencies: Dependencies) -> None:
        self.dependencies = dependencies
        self.notices = Puller(bus, subjects.FINISHED_STREAM, [subjects.RESOLVER_CONSUMER], RESOLVER_WINDOW, self._on_notice)
        self.timeouts = Puller(bus, subjects.TIMERS_STREAM, [subjects.DEPS_TIMEOUT_CONSUMER], DEPS_TIMEOUT_WINDOW, self._on_timeout)
        self.notices_settler = Settler(bus, self.notices)
        self.timeouts_settler = Settler(bus, self.timeouts)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for puller in (self.notices, self.timeouts):
                tg.start_soon(_run, puller)

    async def shutdown(self) -> None:
        self.notices.stop()
        self.timeouts.stop()

    def _on_notice(self, _level: int, msg: Delivery) -> None:
        try:
            notice = _decode_notice(msg.data)
        except msgspec.DecodeError as exc:
            log.error("unreadable notice of finished tasks (seq %d): %s; dropping it", msg.stream_seq, exc)
            self.notices_settler.settle(msg, ACK)
            return
        self.notices_settler.settle_after(msg, self.dependencies.resolve(notice), f"resolving the dependants of {len(notice)} finished task(s)")

    def _on_timeout(self, _level: int, msg: Delivery) -> None:
        task_id = msg.data.decode(errors="replace")
        self.timeouts_settler.settle_after(msg, self.dependencies.time_out(task_id), f"the dependency timeout of {task_id}")


async def _run(puller: Puller) -> None:
    await puller.run()
    await puller.finish()
