"""Records lifecycle events in EVENTS, the events of many tasks to a message.

A role records the events of the messages it handles in one loop tick together: one
EVENTS message on ``events.<source>`` (``events.master``, ``events.worker``…) holds a JSON
array of them, up to :data:`MAX_EVENTS` or :data:`MAX_BYTES`. Per task that is three
messages fewer to publish and acknowledge, store, deliver to the projector and ack again:
about a third of what a task costs the cores when each event is a message of its own.
With projector partitions (the ``projector_partitions`` setting) a tick's events go in one
message per partition on ``events.<source>.<partition>``, so that each projector reads
every event of its own tasks and no other's.

:meth:`EventRecorder.record` returns the :class:`Recording` (the message) the events
went into; a role acks its upstream message only when it (and its downstream publish)
has landed. A failed publish is sent again under the same ``Nats-Msg-Id``, so a lost PubAck
never stores a message twice. What is not deduplicated: a hop that crashes after
recording and before acking is redelivered and records its events again, in another
message. The fold is idempotent, and :func:`streamsched.eventlog.reader.history` shows
each step once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Generator, Iterable
from typing import Any

from .. import subjects
from ..transport.bus import REPUBLISH_DELAYS_S, Bus, explain
from . import events as ev

log = logging.getLogger("streamsched.recorder")

#: Events in one message at most. A message is sealed at the end of the loop tick that
#: opened it, so under load it holds what one tick handled: the deliveries of one read
#: of the connection for a master or regional scheduler (up to 32 KB, about 100 tasks,
#: so this limit applies), the tasks that ended for a worker.
MAX_EVENTS = 128
#: Bytes of events in one message at most (an event larger than this goes alone).
MAX_BYTES = 256 * 1024


class Recording:
    """A message being filled and sent (events here, tasks in
    :mod:`streamsched.roles.sched_batches`). The hops whose parts it holds wait for it
    with :meth:`then`: a callback each, called directly when it lands (a future would
    schedule each on the loop, about a microsecond per hop per task). Awaitable too."""

    __slots__ = ("done", "error", "parts", "size", "waiters")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.size = 2
        self.done = False
        self.error: BaseException | None = None
        self.waiters: list[Callable[[BaseException | None], None]] = []

    def then(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error_or_None)`` once the message landed (or failed for good)."""
        if self.done:
            callback(self.error)
        else:
            self.waiters.append(callback)

    def _finish(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        waiters, self.waiters = self.waiters, []
        for callback in waiters:
            callback(error)

    def __await__(self) -> Generator[Any, None, None]:
        if not self.done:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def settle(error: BaseException | None) -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(None)

            self.then(settle)
            yield from future.__await__()
        if self.error is not None:
            raise self.error


class EventRecorder:
    """Publishes events on ``events.<source>``, those of one loop tick in one message; with
    ``partitions`` above 1, on ``events.<source>.<k>``, one message per projector partition
    ``k`` a tick has events for (a task's events always in its partition: see
    :func:`~streamsched.subjects.event_partition`)."""

    def __init__(self, bus: Bus, source: str, partitions: int = 1) -> None:
        self.bus = bus
        self.partitions = partitions
        self.subjects = [subjects.events(source)] if partitions == 1 else [subjects.events(source, k) for k in range(partitions)]
        self._id_prefix = f"{source}:{os.urandom(6).hex()}:"
        self._count = 0
        self._open: list[Recording | None] = [None] * partitions
        if partitions > 1:  # chosen once here: record() is on every role's per-task path
            self.record = self._record_partitioned  # type: ignore[method-assign]

    def record(self, events: Iterable[ev.Event]) -> Recording:
        """Add ``events`` (in the order they happened) to the open message; returns it.

        More events than one message holds (a batch or a workflow taken in at once), or
        events of several partitions, go into as many messages as they need, in order; the
        returned recording then stands for all of them (it lands when the last one has)."""
        parts = [ev.encode(event) for event in events]
        size = sum(len(part) + 1 for part in parts)
        if len(parts) > MAX_EVENTS or size > MAX_BYTES:
            return self._record_in_chunks(parts, 0)
        return self._add(parts, size, 0)

    def _record_partitioned(self, events: Iterable[ev.Event]) -> Recording:
        by_partition: dict[int, list[bytes]] = {}
        for event in events:
            partition = subjects.event_partition(event.task_id, self.partitions)
            by_partition.setdefault(partition, []).append(ev.encode(event))
        recordings = [self._record_parts(parts, partition) for partition, parts in by_partition.items()]
        return recordings[0] if len(recordings) == 1 else _joint(recordings)

    def _record_parts(self, parts: list[bytes], partition: int) -> Recording:
        size = sum(len(part) + 1 for part in parts)
        if len(parts) > MAX_EVENTS or size > MAX_BYTES:
            return self._record_in_chunks(parts, partition)
        return self._add(parts, size, partition)

    def _add(self, parts: list[bytes], size: int, partition: int) -> Recording:
        batch = self._open[partition]
        if batch is not None and (len(batch.parts) + len(parts) > MAX_EVENTS or batch.size + size > MAX_BYTES):
            self._seal(partition)
            batch = None
        if batch is None:
            batch = self._open[partition] = Recording()
            asyncio.get_running_loop().call_soon(self._seal_tick, batch, partition)
        batch.parts += parts
        batch.size += size
        return batch

    def _record_in_chunks(self, parts: list[bytes], partition: int) -> Recording:
        chunks: list[tuple[list[bytes], int]] = [([], 0)]
        for part in parts:
            chunk, size = chunks[-1]
            if chunk and (len(chunk) >= MAX_EVENTS or size + len(part) + 1 > MAX_BYTES):
                chunks.append(([], 0))
                chunk, size = chunks[-1]
            chunk.append(part)
            chunks[-1] = (chunk, size + len(part) + 1)
        return _joint([self._add(chunk, size, partition) for chunk, size in chunks])

    def _seal_tick(self, batch: Recording, partition: int) -> None:
        if self._open[partition] is batch:
            self._seal(partition)

    def _seal(self, partition: int) -> None:
        batch, self._open[partition] = self._open[partition], None
        assert batch is not None
        self._count += 1
        body = b"[" + b",".join(batch.parts) + b"]"
        send(self.bus, self.subjects[partition], body, {subjects.H_MSG_ID: self._id_prefix + str(self._count)}, batch)


def _joint(recordings: list[Recording]) -> Recording:
    """One recording that lands when all of ``recordings`` have (failing with the first error)."""
    joint = Recording()
    remaining = len(recordings)
    if not recordings:  # nothing to wait for (record([]) with partitions)
        joint._finish(None)
    first_error: list[BaseException] = []

    def landed(error: BaseException | None) -> None:
        nonlocal remaining
        remaining -= 1
        if error is not None and not first_error:
            first_error.append(error)
        if remaining == 0:
            joint._finish(first_error[0] if first_error else None)

    for recording in recordings:
        recording.then(landed)
    return joint


def send(bus: Bus, subject: str, body: bytes, headers: dict[str, str] | bytes, recording: Recording, attempt: int = 0) -> None:
    """Publish the body of ``recording`` and finish it once it landed. A failed publish
    (lost PubAck, reconnect) is sent again under the same ``Nats-Msg-Id`` after each of
    :data:`REPUBLISH_DELAYS_S`, so it is never stored twice; then the recording fails and
    the hops that wait for it are redelivered. Nothing here waits: no task or future per message."""

    def landed(error: BaseException | None) -> None:
        if error is None:
            recording._finish(None)
        elif attempt < len(REPUBLISH_DELAYS_S):
            asyncio.get_running_loop().call_later(REPUBLISH_DELAYS_S[attempt], send, bus, subject, body, headers, recording, attempt + 1)
        else:
            log.warning("%s not published after %d tries (%s); its hops are redelivered", subject, attempt + 1, explain(error))
            recording._finish(error)

    try:
        bus.publish_all([(subject, body, headers)], landed)
    except Exception as exc:  # noqa: BLE001 - any failed publish takes the republish path
        landed(exc)
