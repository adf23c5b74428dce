"""The state projector: folds EVENTS into KV ``tasks`` (one value per task).

Event messages arrive through a continuous pull; a message holds the events of many
tasks (see :mod:`streamsched.eventlog.recorder`). Its events are decoded on arrival and held by
task until the task's state is final, or for at most :data:`HOLD_S`, and then written
together: a task that runs within that time costs one KV write for all its events.
Final states are written after :data:`COALESCE_S`. Every write is a compare-and-set on
the key's last revision, known from the cache of recent states, or read first (many keys
per request) for a task that is neither cached nor new; with several projectors the
loser re-reads the key and folds again. The fold itself is idempotent and
order-insensitive (:func:`streamsched.eventlog.state.fold`), so redelivered or reordered events
end in the same state. A message is acked only once the states of all the tasks it
names are written.

A corrupt or unknown event message never stops the projector: it is logged with its
stream sequence, counted, and acked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.errors import APIError, BadRequestError, NotFoundError

from .. import logs, subjects
from ..config import Settings
from ..eventlog import events as ev
from ..eventlog.reader import decode
from ..eventlog.state import (
    COMPARE_AND_SET,
    MAX_GET_MANY,
    WRONG_LAST_SEQUENCE,
    StateStore,
    encode_state,
    fold,
    note_messages,
)
from ..model import Status, TaskState
from ..transport import streams
from ..transport.bus import ACK, Bus
from ..transport.pull import Puller
from ..transport.reading import ReadStats
from ..transport.wire import Delivery
from .resolver import encode_notice
from .settle import Settler
from .workflows import WORKFLOW_LABEL, WorkflowTracker

log = logging.getLogger("streamsched.projector")

#: Event messages held un-acked at once: see :data:`~streamsched.transport.streams.PROJECTOR_WINDOW`.
WINDOW = streams.PROJECTOR_WINDOW
#: Past this many held events (decoded, about 0.37 KB each), or half the window in
#: messages, the oldest tasks are written without waiting for ``HOLD_S``.
PRESSURE = 12_000
#: Longest a task's state waits for more of its events before it is written anyway.
HOLD_S = 1.0
#: Tasks written in one batch at most: bounds the memory a flush takes (decoded events,
#: encoded states, PubAck futures) whatever the window.
MAX_BATCH = 2000
#: Task states kept in memory so that the common case needs no KV read.
CACHE_SIZE = 50_000
#: Events that open a task's record. A task whose batch has none and whose state is not
#: cached has a stored state: it is read before it is written.
OPENING: frozenset[type] = frozenset({ev.Submitted, ev.Rejected, ev.Waiting})
#: How often a projector whose durable does not exist looks for it again (and says so).
DURABLE_CHECK_S = 10.0
#: How long a batch waits for more events before it is folded. Projection lag, and also
#: task latency: a dependant is released only once its dependency's final state is written.
COALESCE_S = 0.001


class _Message:
    """An event message held until the states of all the tasks it names are written."""

    __slots__ = ("reply", "seq", "unwritten")

    def __init__(self, reply: str, unwritten: int, seq: int) -> None:
        self.reply = reply
        self.unwritten = unwritten
        self.seq = seq


class _Held:
    """The events of one task received and not yet written, and the messages they came in."""

    __slots__ = ("events", "final", "messages", "since")

    def __init__(self, since: float) -> None:
        self.events: list[ev.Event] = []
        self.messages: list[_Message] = []
        self.since = since
        self.final = False


#: A batch to write: what is held of each task (its events, and the messages they came in), by task id.
Batch = dict[str, _Held]
#: A written batch's final statuses by task id, and its workflow tasks' statuses by workflow.
_Settled = tuple[dict[str, Status], dict[str, dict[str, tuple[Status, float]]]]
#: Written batches being followed up at once, at most (the next batch waits for one).
FOLLOW_UPS = 4


class Projector:
    """Keeps KV ``tasks`` equal to the fold of EVENTS."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        store: StateStore,
        *,
        consumer: str = subjects.PROJECTOR_CONSUMER,
        follow_up: bool = True,
    ) -> None:
        """``store`` is the bucket written; ``consumer`` the durable on EVENTS read. A rebuild
        uses its own, without ``follow_up``: the tasks it folds finished long ago, so it
        neither tells the resolvers what finished nor updates workflow records."""
        self.settings = settings
        self.bus = bus
        self.store = store
        self.consumer = consumer
        self.puller = Puller(bus, subjects.EVENTS_STREAM, [consumer], WINDOW, self._on_message)
        self.settler = Settler(bus, self.puller)
        self.cache: collections.OrderedDict[str, tuple[TaskState, int]] = collections.OrderedDict()
        self._held: dict[str, _Held] = {}  # in arrival order of each task's first event
        self._held_events = 0
        self._held_msgs = 0  # what max_ack_pending counts
        self._final: list[str] = []  # held tasks whose state is final: written next
        self._wake = asyncio.Event()
        self.stats = ReadStats()
        self.applied = 0
        # Told of each written batch: the tasks it made final, the workflow tasks it changed.
        self.workflows = WorkflowTracker(bus) if follow_up else None
        self._follow_ups = asyncio.Semaphore(FOLLOW_UPS)
        self._following: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        await self._wait_for_durable()
        log.info("projector folding EVENTS (durable %s) into KV %s", self.consumer, self.store.bucket)
        flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        try:
            await self.puller.run()
            await self.puller.finish()  # the flush loop settles what was received
        finally:
            flusher.cancel()

    async def shutdown(self) -> None:
        self._stopping.set()
        self.puller.stop()

    async def _wait_for_durable(self) -> None:
        """Return once the durable exists, or the projector is stopped. Without it each pull
        is answered "no such consumer" and nothing is folded, in silence: ``streams apply``
        makes a partition's durable for its ``projector_partitions``, and one with a lower
        count deletes the durables of the partitions it drops."""
        while True:
            try:
                await self.bus.js.consumer_info(subjects.EVENTS_STREAM, self.consumer)
                return
            except NotFoundError:
                log.error(
                    "EVENTS has no durable %s: run `streamsched streams apply` with STREAMSCHED_PROJECTOR_PARTITIONS=%d; looking again in %gs",
                    self.consumer,
                    self.settings.projector_partitions,
                    DURABLE_CHECK_S,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), DURABLE_CHECK_S)
                return

    def _on_message(self, _level: int, msg: Delivery) -> None:
        events = decode(msg.stream_seq, msg.data, self.stats)
        if not events:  # nothing to fold: nothing to wait for
            self.settler.settle(msg, ACK)
            return
        now = time.monotonic()
        message = _Message(msg.reply, 0, msg.stream_seq)
        self._held_msgs += 1
        for event in events:
            held = self._held.get(event.task_id)
            if held is None:
                if not subjects.is_token(event.task_id):  # a KV key: a bad one would fail every write
                    self.stats.skipped += 1
                    log.warning(
                        "skipping an event of task %r (not a subject token) at EVENTS seq %d",
                        event.task_id[:200],
                        msg.stream_seq,
                    )
                    continue
                held = self._held[event.task_id] = _Held(now)
            if not held.messages or held.messages[-1] is not message:
                held.messages.append(message)
                message.unwritten += 1
            held.events.append(event)
            self._held_events += 1
            if not held.final and type(event) in ev.FINAL_TYPES:
                held.final = True
                self._final.append(event.task_id)
                self._wake.set()
        if message.unwritten == 0:  # every event skipped
            self._held_msgs -= 1
            self.settler.settle(msg, ACK)
        if self._held_events > PRESSURE or self._held_msgs > WINDOW // 2:
            self._wake.set()

    def _due(self) -> tuple[Batch, list[_Message]]:
        """Take the tasks to write now, at most :data:`MAX_BATCH`: final ones, then, oldest
        first, those held ``HOLD_S`` and as many more as it takes to get back under
        :data:`PRESSURE`. If more are due, the flush loop is woken again at once.
        Returns the batch and the messages its tasks came in."""
        batch: Batch = {}
        messages: list[_Message] = []
        # Tasks taken per held message, to know which messages this batch will free: the
        # window is relieved by those, before any task is written early for its sake.
        taken: dict[_Message, int] = {}
        freed = 0

        def count(held: _Held) -> None:
            nonlocal freed
            for message in held.messages:
                taken[message] = times = taken.get(message, 0) + 1
                if times == message.unwritten:
                    freed += 1

        def take(task_id: str) -> None:
            held = self._held.pop(task_id)
            self._held_events -= len(held.events)
            batch[task_id] = held
            messages.extend(held.messages)

        finals = self._final[:MAX_BATCH]
        del self._final[:MAX_BATCH]
        for task_id in finals:
            held = self._held.get(task_id)
            if held is not None:  # not already taken as one of the oldest
                count(held)
                take(task_id)
        cutoff = time.monotonic() - HOLD_S
        excess_events = self._held_events - PRESSURE
        old: list[str] = []
        for task_id, held in self._held.items():  # dicts keep insertion order: oldest first
            excess_msgs = self._held_msgs - freed - WINDOW // 2
            if (held.since > cutoff and excess_events <= 0 and excess_msgs <= 0) or len(batch) + len(old) >= MAX_BATCH:
                break
            old.append(task_id)
            excess_events -= len(held.events)
            count(held)
        for task_id in old:
            take(task_id)
        if self._final or len(batch) >= MAX_BATCH:
            self._wake.set()
        return batch, messages

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=HOLD_S / 4)
            # Let a task's next events join this batch: fewer KV writes per task.
            await asyncio.sleep(COALESCE_S)
            self._wake.clear()
            batch, messages = self._due()
            if not messages:
                continue
            await self._retry(functools.partial(self._write_logged, batch))
            if self.workflows is None:
                self._ack(messages)
                continue
            # What follows a write goes beside the next writes, not before them: the next
            # batch's final states must not wait for it. The messages are acked once it landed too.
            await self._follow_ups.acquire()
            follow_up = asyncio.get_running_loop().create_task(self._follow_up_then_ack(self._settled(batch), messages))
            self._following.add(follow_up)
            follow_up.add_done_callback(self._following.discard)

    @staticmethod
    async def _retry(step: Callable[[], Awaitable[bool]]) -> None:
        """Run ``step`` until it returns True. Retried in place: acking later batches
        meanwhile would reorder nothing, but a stuck batch must not be silently left to
        ack_wait while others pass."""
        delay = 0.1
        while not await step():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _ack(self, messages: list[_Message]) -> None:
        """One ack per event message, once all its tasks are written (and resolved). (A
        cumulative "ack all" would be cheaper, but with a crashed predecessor or a second
        projector it would also ack events that another process received and never folded.)"""
        for message in messages:
            message.unwritten -= 1
            if message.unwritten == 0:
                self._held_msgs -= 1
                self.applied += 1
                self.settler.settle_reply(message.reply, ACK)

    async def _follow_up_then_ack(self, settled: _Settled, messages: list[_Message]) -> None:
        try:
            await self._retry(functools.partial(self._follow_up_logged, settled))
        finally:
            self._follow_ups.release()
        self._ack(messages)

    async def _write_logged(self, batch: Batch) -> bool:
        """:meth:`_write`, but a bug in it is logged and retried rather than ending the loop."""
        try:
            return await self._write(batch)
        except Exception:
            log.exception("projecting a batch of %d task(s) failed; retrying", len(batch))
            return False

    def _settled(self, batch: Batch) -> _Settled:
        """What the written ``batch`` means beyond the states: its tasks whose state is final
        (for the resolvers) and the statuses of workflow tasks (for the workflow tracker).
        Taken from the cache right after the write, before later events change it. A plain
        task costs a cache and a label lookup here."""
        finished: dict[str, Status] = {}
        workflows: dict[str, dict[str, tuple[Status, float]]] = {}
        for task_id in batch:
            entry = self.cache.get(task_id)
            if entry is None:
                continue
            state = entry[0]
            if state.status.is_final:
                finished[task_id] = state.status
            workflow = state.labels.get(WORKFLOW_LABEL) if state.labels else None
            if workflow is not None:
                workflows.setdefault(workflow, {})[task_id] = (state.status, state.updated_at or 0.0)
        return finished, workflows

    async def _follow_up_logged(self, settled: _Settled) -> bool:
        """Publish a written batch's final tasks as one notice for the masters' resolvers
        (:mod:`streamsched.roles.resolver`), and give its workflow tasks to the workflow
        tracker, before its event messages are acked (a crash redoes this); True when both landed."""
        if self.workflows is None:
            return True
        finished, workflows = settled
        try:
            await asyncio.gather(self._notify(finished), self.workflows.update(workflows))
        except Exception:
            log.exception("following up a batch of %d finished task(s) failed; retrying", len(finished))
            return False
        return True

    async def _notify(self, finished: dict[str, Status]) -> None:
        if finished:
            await (await self.bus.publish(subjects.FINISHED, encode_notice(finished)))

    async def _write(self, batch: Batch) -> bool:
        """Fold and write every task of the batch; True when all writes landed."""
        if not batch:  # only skipped events
            return True
        # Not cached and not new: a write expecting no state would fail, so read them first.
        unknown = [t for t, held in batch.items() if t not in self.cache and OPENING.isdisjoint(map(type, held.events))]
        stored: dict[str, tuple[TaskState, int]] = {}
        try:
            for start in range(0, len(unknown), MAX_GET_MANY):
                stored.update(await self.store.get_many(self.bus, unknown[start : start + MAX_GET_MANY]))
            states: list[TaskState] = []
            puts: list[tuple[str, bytes, bytes]] = []
            for task_id, held in batch.items():
                state, revision = self._folded(task_id, held, stored.get(task_id))
                states.append(state)
                puts.append(self._write_of(task_id, state, revision))
            written = await self.bus.publish_gathered(puts)
        except Exception as exc:  # noqa: BLE001 - any failed read or send: the caller retries the batch
            log.debug("state writes not sent: %r", exc)
            return False
        await written.done
        ok = True
        conflicted: list[str] = []  # another writer, or a state read before it was stored
        for task_id, state, result in zip(batch, states, written.results, strict=True):
            if isinstance(result, dict):
                self._remember(task_id, (state, result["seq"]))
            elif isinstance(result, APIError) and result.err_code == WRONG_LAST_SEQUENCE:
                conflicted.append(task_id)
            elif isinstance(result, BadRequestError):
                # Refused by the server for good (e.g. too large): retrying would block every
                # task behind it. The events stay in EVENTS; rebuild-state can fold them again.
                log.error("state of task %s not written (%s); its events are kept in EVENTS", task_id, result, extra=logs.task(task_id))
                self._remember(task_id, None)
            else:
                log.debug("state write failed for %s: %r", task_id, result)
                self._remember(task_id, None)
                ok = False
        for start in range(0, len(conflicted), MAX_GET_MANY):  # rare: as many at a time as one read
            chunk = conflicted[start : start + MAX_GET_MANY]
            careful = await asyncio.gather(*(self._write_one_carefully(task_id, batch[task_id]) for task_id in chunk))
            ok = all(careful) and ok
        return ok

    async def _write_one_carefully(self, task_id: str, held: _Held) -> bool:
        """After a CAS conflict (another writer, or a stale or empty cache): read, fold, write."""
        for _ in range(5):
            current = await self.store.get(task_id)
            self._remember(task_id, current)
            state, revision = self._folded(task_id, held)
            try:
                written = await (await self._put(task_id, state, revision))
            except APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    continue
                return False
            except Exception:  # noqa: BLE001 - any failed send: the caller retries the batch
                return False
            self._remember(task_id, (state, written["seq"]))
            return True
        return False

    def _folded(self, task_id: str, held: _Held, stored: tuple[TaskState, int] | None = None) -> tuple[TaskState, int]:
        """The task's state with the ``held`` events folded in (and the EVENTS sequences of
        their messages noted), and the revision to write it over: of the cached state, else
        of ``stored`` (just read), else 0 (a new task)."""
        cached = self.cache.get(task_id) or stored
        # Folded in place: a failed write drops the entry or folds the same events again,
        # which changes nothing (fold is idempotent); the revision moves only on success.
        state, revision = cached if cached else (None, 0)
        for event in held.events:
            state = fold(state, event)
        assert state is not None
        note_messages(state, [message.seq for message in held.messages])
        return state, revision

    async def _put(self, task_id: str, state: TaskState, revision: int) -> asyncio.Future[dict[str, Any]]:
        return await self.bus.publish(*self._write_of(task_id, state, revision))

    def _write_of(self, task_id: str, state: TaskState, revision: int) -> tuple[str, bytes, bytes]:
        """The publish that writes ``state`` if the key's last revision is ``revision``."""
        return self.store.put_subject(task_id), encode_state(state), COMPARE_AND_SET % revision

    def _remember(self, task_id: str, entry: tuple[TaskState, int] | None) -> None:
        if entry is None:
            self.cache.pop(task_id, None)
            return
        state = entry[0]
        # Cached states share one copy of the strings that repeat from task to task, and
        # are keyed by their own id string: about 15 MB less at CACHE_SIZE entries.
        state.type = state.type and sys.intern(state.type)
        state.priority = state.priority and sys.intern(state.priority)
        state.region = state.region and sys.intern(state.region)
        state.worker = state.worker and sys.intern(state.worker)
        self.cache[state.id] = entry
        self.cache.move_to_end(state.id)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
