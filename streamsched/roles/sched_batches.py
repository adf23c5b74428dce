"""SCHED batches: the tasks a master hands to one region and priority in one loop tick
travel in one message.

Under load a master handles a whole read of submissions per loop tick (about a hundred).
A SCHED message of its own for each task costs a store and a removal in nats-server, a
publish and its PubAck, a delivery and an ack: of everything a task costs end to end,
the largest share that buys nothing per task (batches take the regional scheduler from
19-20 to 8 µs per task). So the tasks of one tick for one ``sched.<region>.<priority>``
subject share a message:

* one task: the message is the task itself (its header block with
  ``Nats-Msg-Id: <task>:sched:0``, its body the submission's bytes);
* several: header ``Streamsched-Batch: <count>`` and a msgpack array of
  ``[header block, body]`` pairs, each what the single message would have been.

The regional scheduler releases each task of a batch onto WORK as its own message and
acks the batch once all of them landed. A batch's ``Nats-Msg-Id`` is its own (a publish
that is sent again is stored once); a submission redelivered to a master may land in
another batch, and then WORK drops the second copy by the task's own msg id
(``<task>:work:0``), inside the same dedupe window (``duplicate_window_s``).
"""

from __future__ import annotations

import asyncio
import os

import msgspec

from .. import subjects
from ..eventlog.recorder import Recording, send
from ..transport import streams
from ..transport.bus import Bus

#: Tasks in one batch at most (the SCHED consumers' windows count on it).
MAX_TASKS = streams.SCHED_BATCH_MAX_TASKS
#: Bytes of tasks in one batch at most (a task larger than this goes alone).
MAX_BYTES = 256 * 1024

#: ``[header block, body]`` of each task of a batch.
Entries = list[tuple[bytes, bytes]]

_decoder = msgspec.msgpack.Decoder(Entries)
_BATCH_HEADERS = f"NATS/1.0\r\n{subjects.H_MSG_ID}: %s\r\n{subjects.H_BATCH}: %d\r\n\r\n".encode()


def decode(body: bytes) -> Entries:
    """The tasks of a batch message; raises ``msgspec.DecodeError`` if it is not one."""
    return _decoder.decode(body)


def message(parts: Entries, msg_id: str) -> tuple[bytes, bytes]:
    """``(header block, body)`` of a message holding the tasks ``parts`` (one task: itself)."""
    if len(parts) == 1:
        return parts[0]
    return _BATCH_HEADERS % (msg_id.encode(), len(parts)), msgspec.msgpack.encode(parts)


def batches(parts: Entries) -> list[Entries]:
    """``parts`` (the tasks for one subject) cut into batches of at most :data:`MAX_TASKS` and :data:`MAX_BYTES`."""
    out: list[Entries] = [[]]
    size = 0
    for headers, body in parts:
        part_size = len(headers) + len(body) + 8
        if out[-1] and (len(out[-1]) >= MAX_TASKS or size + part_size > MAX_BYTES):
            out.append([])
            size = 0
        out[-1].append((headers, body))
        size += part_size
    return out


class TaskBatcher:
    """Publishes a master's tasks to SCHED, those of one loop tick and subject in one message."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._id_prefix = f"batch:{os.urandom(6).hex()}:"
        self._count = 0
        self._open: dict[str, Recording] = {}

    def add(self, subject: str, data: bytes, headers: bytes) -> Recording:
        """Add one task (its SCHED header block and body) to the open message of ``subject``;
        returns that message, which the task's hop waits for."""
        size = len(data) + len(headers) + 8
        batch = self._open.get(subject)
        if batch is not None and (len(batch.parts) >= MAX_TASKS or batch.size + size > MAX_BYTES):
            self._seal(subject)
            batch = None
        if batch is None:
            if not self._open:
                asyncio.get_running_loop().call_soon(self._seal_tick)
            batch = self._open[subject] = Recording()
        batch.parts.append((headers, data))
        batch.size += size
        return batch

    def _seal_tick(self) -> None:
        for subject in list(self._open):
            self._seal(subject)

    def _seal(self, subject: str) -> None:
        batch = self._open.pop(subject)
        self._count += 1
        headers, body = message(batch.parts, self._id_prefix + str(self._count))
        send(self.bus, subject, body, headers, batch)
