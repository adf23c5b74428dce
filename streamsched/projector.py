"""The state projector: folds EVENTS into KV ``tasks`` (one value per task).

Events arrive in batches through a continuous pull. Each batch is grouped by task, so a
task with several events in flight costs one KV write, not one per event. Every write
is a compare-and-set on the key's last revision: with several projectors, or a stale
cache, the loser re-reads the key and folds again. The fold itself is idempotent and
order-insensitive (:func:`streamsched.state.fold`), so redelivered or reordered events
end in the same state. Events are acked only after their write landed.

A corrupt or unknown event never stops the projector: it is logged with its stream
sequence, counted, and terminated.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import msgspec
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.errors import APIError

from . import events as ev
from . import subjects
from .bus import ACK, Bus, Puller, Settler, delivery_info, nak_with_delay, term_with_reason
from .config import Settings
from .model import TaskState
from .state import EXPECTED_LAST_SUBJECT_SEQ, StateStore, encode_state, fold, put_subject

log = logging.getLogger("streamsched.projector")

#: Events held un-acked at once; also the largest batch folded together.
WINDOW = 4000
#: Task states kept in memory so that the common case needs no KV read.
CACHE_SIZE = 50_000
#: JetStream error code of a failed ``Nats-Expected-Last-Subject-Sequence`` check.
WRONG_LAST_SEQUENCE = 10071


class Projector:
    """Keeps KV ``tasks`` equal to the fold of EVENTS."""

    def __init__(self, settings: Settings, bus: Bus, store: StateStore) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.puller = Puller(bus, subjects.EVENTS_STREAM, [subjects.PROJECTOR_CONSUMER], WINDOW, self._on_message)
        self.settler = Settler(bus, self.puller)
        self.cache: collections.OrderedDict[str, tuple[TaskState, int]] = collections.OrderedDict()
        self._batch: dict[str, list[tuple[ev.Event, Msg]]] = {}
        self._wake = asyncio.Event()
        self.skipped = 0
        self.applied = 0

    async def run(self) -> None:
        log.info("projector folding EVENTS into KV %s", subjects.STATE_BUCKET)
        flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        try:
            await self.puller.run()
        finally:
            flusher.cancel()

    async def shutdown(self) -> None:
        self.puller.stop()

    def _on_message(self, _level: int, msg: Msg) -> None:
        try:
            event = ev.decode(msg.data)
        except msgspec.DecodeError as exc:
            self.skipped += 1
            seq = delivery_info(msg.reply)[1]
            log.warning("skipping undecodable event at EVENTS seq %d (%s): %s", seq, msg.subject, exc)
            self.settler.settle(msg, term_with_reason("undecodable event"))
            return
        self._batch.setdefault(event.task_id, []).append((event, msg))
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, {}
            if batch:
                await asyncio.gather(*(self._apply(task_id, items) for task_id, items in batch.items()))

    async def _apply(self, task_id: str, items: list[tuple[ev.Event, Msg]]) -> None:
        for _ in range(5):
            cached = self.cache.get(task_id)
            state, revision = (msgspec.structs.replace(cached[0]), cached[1]) if cached else (None, 0)
            for event, _msg in items:
                state = fold(state, event)
            assert state is not None
            try:
                ack: PubAck = await (
                    await self.bus.publish(
                        put_subject(task_id), encode_state(state), {EXPECTED_LAST_SUBJECT_SEQ: str(revision)}
                    )
                )
            except APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    break
                # Another writer, or our cache was stale or empty: read and fold again.
                current = await self.store.get(task_id)
                self._remember(task_id, current if current else None)
                continue
            except Exception as exc:  # noqa: BLE001 - not connected: retry the batch later
                log.debug("state write failed for %s: %r", task_id, exc)
                break
            self._remember(task_id, (state, ack.seq))
            self.applied += len(items)
            for _event, msg in items:
                self.settler.settle(msg, ACK)
            return
        for _event, msg in items:
            self.settler.settle(msg, nak_with_delay(1.0))

    def _remember(self, task_id: str, entry: tuple[TaskState, int] | None) -> None:
        if entry is None:
            self.cache.pop(task_id, None)
            return
        self.cache[task_id] = entry
        self.cache.move_to_end(task_id)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
