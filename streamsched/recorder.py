"""Records lifecycle events in EVENTS, the events of many tasks to a message.

A role records the events of the messages it handles in one loop tick together: one
EVENTS message on ``events.<source>`` (``events.master``, ``events.worker``…) holds a JSON
array of them, up to :data:`MAX_EVENTS` or :data:`MAX_BYTES`. Per task that is three
messages fewer to publish and acknowledge, store, deliver to the projector and ack again:
about a third of what a task cost the cores (measured in docs/BENCHMARKS.md).

:meth:`EventRecorder.record` returns the future of the message the events went into; a
role acks its upstream message only when that future (and its downstream publish) has
landed. A failed publish is sent again under the same ``Nats-Msg-Id``, so a lost PubAck
never stores a message twice. What is not deduplicated: a hop that crashes after
recording and before acking is redelivered and records its events again, in another
message. The fold is idempotent, and :func:`streamsched.eventlog.history` shows each
step once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable

from . import events as ev
from . import subjects
from .bus import REPUBLISH_DELAYS_S, Bus

log = logging.getLogger("streamsched.recorder")

#: Events in one message at most. A message is sealed at the end of the loop tick that
#: opened it, so under load it holds what one tick handled: the deliveries of one read
#: of the connection for a master or regional scheduler (up to 32 KB, about 100 tasks,
#: so this limit applies), the tasks that ended for a worker.
MAX_EVENTS = 128
#: Bytes of events in one message at most (an event larger than this goes alone).
MAX_BYTES = 256 * 1024


class _Open:
    """A message being filled: its encoded events and the future its recorders wait on."""

    __slots__ = ("future", "parts", "size")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.parts: list[bytes] = []
        self.size = 2


class EventRecorder:
    """Publishes events on ``events.<source>``, those of one loop tick in one message."""

    def __init__(self, bus: Bus, source: str) -> None:
        self.bus = bus
        self.subject = subjects.events(source)
        self._id_prefix = f"{source}:{os.urandom(6).hex()}:"
        self._count = 0
        self._open: _Open | None = None
        self._sending: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly

    def record(self, events: Iterable[ev.Event]) -> asyncio.Future[None]:
        """Add ``events`` (in the order they happened) to the open message; its future."""
        parts = [ev.encode(event) for event in events]
        size = sum(len(part) + 1 for part in parts)
        batch = self._open
        if batch is not None and (len(batch.parts) + len(parts) > MAX_EVENTS or batch.size + size > MAX_BYTES):
            self._seal()
            batch = None
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._open = _Open(loop.create_future())
            loop.call_soon(self._seal_tick, batch)
        batch.parts += parts
        batch.size += size
        return batch.future

    def _seal_tick(self, batch: _Open) -> None:
        if self._open is batch:
            self._seal()

    def _seal(self) -> None:
        batch, self._open = self._open, None
        assert batch is not None
        self._count += 1
        body = b"[" + b",".join(batch.parts) + b"]"
        task = asyncio.get_running_loop().create_task(self._send(body, self._id_prefix + str(self._count), batch.future))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, body: bytes, msg_id: str, future: asyncio.Future[None]) -> None:
        error: BaseException | None = None
        for delay in (0.0, *REPUBLISH_DELAYS_S):
            if delay:
                await asyncio.sleep(delay)
            try:
                await (await self.bus.publish(self.subject, body, {subjects.H_MSG_ID: msg_id}))
            except Exception as exc:  # noqa: BLE001 - lost PubAck, reconnect: send it again
                error = exc
                continue
            future.set_result(None)
            return
        log.warning("events not recorded after %d tries (%r); their hops are redelivered", len(REPUBLISH_DELAYS_S) + 1, error)
        future.set_exception(error or ConnectionError("events not recorded"))
