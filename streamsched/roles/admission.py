"""Admission: moving tasks parked by their limits (:mod:`streamsched.roles.limits`) onto WORK.

Every regional scheduler runs one, and any of them may admit any lane: the limits are
entries in KV ``limits`` taken by compare-and-set, so two admitting at once never let more
through than a limit allows. A pass lists the lanes that hold tasks (one stream-info
request), then, highest priority first, draws lanes by lottery (weighted by their fairness
keys) and admits a chunk of each lane's oldest tasks, as many as its limits let:

1. for a fairness key, room on the WORK subject (``fairness_window`` less its durable's
   undelivered tasks), checked before the lane is read;
2. the tasks' states, in one batched read: a task past ``waiting`` was admitted before (its
   delete from the lane failed) and is only taken off, as is a cancelled one;
3. the tasks' slots of their concurrency key: the slot a task holds already (taken for it
   by a pass that did not finish), else a KV create of a free one;
4. tokens of their rate limit, one compare-and-set of its bucket for the chunk;

then publishes each one admitted onto its WORK subject (headers as they were, with the msg
id ``<task>:work:0`` and the slots it holds), records ``dispatched`` (or ``held``, when no
live worker handles its type), and deletes it from its lane. A crash in between leaves it
parked with its slot taken in its name, and it is admitted again with that slot; a copy
published twice is stored once (the slots taken for the dropped one are given back); a
slot whose task's state has been final for :data:`SWEEP_AFTER_S` is swept.

A pass runs when a task was parked here, when a slot is freed (a watch on the bucket), when
a rate limit's next token is due, at once when the last pass used its budget, and every
:data:`TICK_S` (for tasks parked by other schedulers; every :data:`FAIR_TICK_S` while a
fair lane waits for room on WORK).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import msgspec
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from .. import logs, subjects
from ..config import Settings
from ..eventlog import events as ev
from ..eventlog.dlq import NO_MESSAGE_FOUND
from ..eventlog.recorder import EventRecorder
from ..eventlog.state import MAX_GET_MANY, WRONG_LAST_SEQUENCE, StateStore
from ..model import Status, TaskState
from ..transport import direct, wire
from ..transport.bus import Bus
from ..transport.kv_watch import BucketWatch
from . import limits
from .cancels import CancelWatch
from .limits import Gates, SlotSet, SlotValue, TokenBucket
from .worker_registry import LiveWorkers

log = logging.getLogger("streamsched.admission")

#: Oldest tasks of a lane taken in one step.
CHUNK = 64
#: Tasks admitted at most in one pass, so a pass ends and the lanes are listed again.
PASS_BUDGET = 2048
#: Longest wait between passes.
TICK_S = 1.0
#: Wait between passes while a fair lane waits for room on its WORK subject.
FAIR_TICK_S = 0.02
#: How often the slots are swept for tasks whose state is final.
SWEEP_S = 10.0
#: Slots looked up in one sweep at most (the next sweep goes on from there).
SWEEP_MAX = 2000
#: How long a task's state must have been final before the sweep frees a slot it still holds
#: (its worker frees it within milliseconds; a cancelled sync handler may still be returning).
SWEEP_AFTER_S = 60.0
#: States of a parked task that was not admitted yet (or not projected since).
NOT_ADMITTED = frozenset({Status.PENDING, Status.WAITING})
#: How long the slots held at the start may take to load.
LOAD_TIMEOUT_S = 10.0

_slot_decoder = msgspec.json.Decoder(SlotValue)
_bucket_decoder = msgspec.json.Decoder(TokenBucket)


@dataclass
class _Known:
    """What the tasks of a lane share (from its oldest task's headers)."""

    region: str
    priority: str
    type: str
    work_subject: str
    gates: Gates | None


@dataclass(frozen=True)
class _Slot:
    """A slot a task holds: its key, the revision it was taken at, and whether this pass took it."""

    key: str
    revision: int
    taken_now: bool


@dataclass
class _Lane:
    subject: str
    priority: str
    parked: int
    weight: float = 1.0


@dataclass
class _Pass:
    """What one pass learned: when a rate limit's token is due, whether a fair lane waits for room."""

    token_due: float | None = None
    fair_waiting: bool = False
    unfinished: bool = False  # the budget ran out with lanes left: the next pass at once
    room: dict[str, int] = field(default_factory=dict)  # WORK subject -> tasks a fair lane may still add


class Admission:
    """Admits the parked tasks of every lane (see the module)."""

    def __init__(self, settings: Settings, bus: Bus, recorder: EventRecorder, cancels: CancelWatch, workers: LiveWorkers) -> None:
        self.settings = settings
        self.bus = bus
        self.recorder = recorder
        self.cancels = cancels
        self.workers = workers
        self.taken: dict[str, str] = {}
        """Slot key -> the task that holds it (a mirror of the bucket's slots)."""
        self.admitted = 0
        self._watch = BucketWatch(bus, subjects.LIMITS_BUCKET, self._on_change)
        self._woken = asyncio.Event()
        self._stopping = False
        self._lanes: dict[str, _Known] = {}  # by lane subject
        self._sweep_from = 0
        self.sweep_after_s = SWEEP_AFTER_S
        self._kv: KeyValue | None = None
        self._states: StateStore | None = None

    def wake(self) -> None:
        """Run a pass soon: a task was parked, or a slot freed."""
        self._woken.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._woken.set()

    async def run(self) -> None:
        while not self._stopping:
            try:
                self._kv = await self.bus.js.key_value(subjects.LIMITS_BUCKET)
                self._states = await StateStore.open(self.bus)
                break
            except Exception as exc:  # noqa: BLE001 - the scheduler goes on releasing the rest
                log.error("KV bucket %s not found (%r): run `streamsched streams apply`; trying again in 10s", subjects.LIMITS_BUCKET, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), 10.0)
        if self._stopping:
            return
        if not await self._watch.start(LOAD_TIMEOUT_S):
            log.warning("slots of the concurrency keys not all loaded after %.0fs; going on, the rest follow", LOAD_TIMEOUT_S)
        next_sweep = time.monotonic() + SWEEP_S
        try:
            while not self._stopping:
                wait_s = TICK_S
                try:
                    learned = await self._pass()
                except Exception as exc:  # noqa: BLE001 - an outage: the tasks stay parked, try again
                    log.warning("admission pass failed (%r); trying again in %.1fs", exc, TICK_S)
                else:
                    if learned.unfinished:
                        wait_s = 0.0
                    elif learned.fair_waiting:
                        wait_s = FAIR_TICK_S
                    if learned.token_due is not None:
                        wait_s = min(wait_s, max(0.0, learned.token_due - time.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), wait_s)
                self._woken.clear()
                if time.monotonic() >= next_sweep and not self._stopping:
                    next_sweep = time.monotonic() + SWEEP_S
                    try:
                        await self._sweep()
                    except Exception as exc:  # noqa: BLE001 - next time
                        log.warning("sweep of the slots failed (%r)", exc)
        finally:
            await self._watch.stop()

    def _on_change(self, key: str, value: bytes | None) -> None:
        if not key.startswith("c."):
            return  # a rate limit's bucket
        if value is None:
            if self.taken.pop(key, None) is not None:
                self.wake()
            return
        try:
            self.taken[key] = _slot_decoder.decode(value).task
        except msgspec.DecodeError:
            self.taken[key] = ""

    async def _pass(self) -> _Pass:
        learned = _Pass()
        info = await self.bus.js.stream_info(subjects.SCHED_STREAM, subjects_filter=subjects.HELD_ALL)
        levels: dict[int, list[_Lane]] = {}
        for subject, parked in (info.state.subjects or {}).items():
            priority = subject.split(".")[1]
            level = self.settings.priorities.index(priority) if priority in self.settings.priorities else len(self.settings.priorities)
            known = self._lanes.get(subject)
            weight = known.gates.weight if known is not None and known.gates is not None else 1.0
            levels.setdefault(level, []).append(_Lane(subject, priority, parked, weight))
        budget = PASS_BUDGET
        for level in sorted(levels):
            lanes = levels[level]
            while lanes and budget > 0:
                lane = random.choices(lanes, weights=[lane.weight for lane in lanes])[0]  # a lottery
                admitted = await self._admit(lane, min(lane.parked, CHUNK, budget), learned)
                budget -= admitted
                lane.parked -= admitted
                if admitted == 0 or lane.parked <= 0:
                    lanes.remove(lane)
            learned.unfinished = learned.unfinished or bool(lanes)
        return learned

    async def _admit(self, lane: _Lane, count: int, learned: _Pass) -> int:
        """Admit up to ``count`` of the lane's oldest tasks; returns how many left it."""
        known = self._lanes.get(lane.subject)
        if known is not None and known.gates is not None and known.gates.fair:  # room first: no read while there is none
            count = min(count, await self._room(learned, known))
            if count <= 0:
                learned.fair_waiting = True
                return 0
        heads = await direct.next_on_subject(self.bus, subjects.SCHED_STREAM, lane.subject, 1, count)
        if not heads:
            return 0
        if known is None:
            known = self._learn(lane, heads[0].headers)
        gates = known.gates
        lane.weight = gates.weight if gates is not None else 1.0
        gone = await self._drop_settled(heads)
        heads = [head for head in heads if head not in gone]
        if not heads:
            return len(gone)
        if gates is not None and gates.fair:
            room = await self._room(learned, known)
            if room <= 0:
                learned.fair_waiting = True
                return len(gone)
            heads = heads[:room]
        held: list[list[_Slot]] = [[] for _ in heads]
        if gates is not None and gates.slots is not None:
            heads, held = await self._take_slots(gates.slots, heads)
        if gates is not None and gates.rate is not None and heads:
            granted, due = await self._take_tokens(*gates.rate, len(heads))
            if due is not None:
                learned.token_due = due if learned.token_due is None else min(learned.token_due, due)
            if granted < len(heads):
                await self._give_back([slot for slots in held[granted:] for slot in slots])
                heads, held = heads[:granted], held[:granted]
        if not heads:
            return len(gone)
        await self._release(heads, held, known)
        if gates is not None and gates.fair:
            learned.room[known.work_subject] -= len(heads)
        return len(gone) + len(heads)

    def _learn(self, lane: _Lane, first: bytes) -> _Known:
        """What a lane's tasks share, from its oldest one's headers (kept while the lane is seen)."""
        task_type = wire.header_value(first, subjects.H_TYPE) or ""
        region = wire.header_value(first, subjects.H_REGION) or ""
        gates = limits.gates(self.settings, task_type, wire.header_value(first, subjects.H_LIMITS))
        if len(self._lanes) > 10_000:
            self._lanes.clear()
        known = self._lanes[lane.subject] = _Known(region, lane.priority, task_type, subjects.work(region, lane.priority, task_type), gates)
        return known

    async def _room(self, learned: _Pass, lane: _Known) -> int:
        """How many more fair tasks the lane's WORK subject takes now: ``fairness_window`` less what waits there undelivered."""
        if lane.work_subject not in learned.room:
            try:
                info = await self.bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(lane.region, lane.priority, lane.type))
                waiting = info.num_pending
            except NotFoundError:  # no worker has made the durable yet: what the subject holds waits
                stream = await self.bus.js.stream_info(subjects.WORK_STREAM, subjects_filter=lane.work_subject)
                waiting = (stream.state.subjects or {}).get(lane.work_subject, 0)
            learned.room[lane.work_subject] = self.settings.fairness_window - waiting
        return learned.room[lane.work_subject]

    async def _take_slots(self, slots: SlotSet, heads: list[direct.Found]) -> tuple[list[direct.Found], list[list[_Slot]]]:
        """Each of ``heads`` with a slot of its concurrency key: the one it holds already (taken
        for it in a pass that did not finish), else a free one (a KV create, all at once)."""
        assert self._kv is not None
        prefix = slots.prefix + "."
        own = {task_id: key for key, task_id in self.taken.items() if key.startswith(prefix)}
        free = iter([key for key in (f"{prefix}{i}" for i in range(slots.limit)) if key not in self.taken])
        plans: list[tuple[direct.Found, str, bool]] = []  # head, slot, whether it is the head's own already
        for head in heads:
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            key = own.get(task_id)
            if key is None:
                key = next(free, None)
                if key is None:
                    continue
            plans.append((head, key, task_id in own))

        async def take(head: direct.Found, key: str, owned: bool) -> _Slot | None:
            assert self._kv is not None
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            try:
                if owned:
                    entry = await self._kv.get(key)
                    if entry.value is None or _slot_decoder.decode(entry.value).task != task_id:
                        return None
                    return _Slot(key, entry.revision or 0, taken_now=False)
                revision = await self._kv.create(key, msgspec.json.encode(SlotValue(task_id, slots.key)))
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                return None  # taken meanwhile by another scheduler, or freed
            self.taken[key] = task_id
            return _Slot(key, revision, taken_now=True)

        got = await asyncio.gather(*(take(head, key, owned) for head, key, owned in plans))
        chosen = [(head, slot) for (head, _, _), slot in zip(plans, got, strict=True) if slot is not None]
        return [head for head, _ in chosen], [[slot] for _, slot in chosen]

    async def _take_tokens(self, key: str, per_s: float, wanted: int) -> tuple[int, float | None]:
        """Take up to ``wanted`` tokens of a rate limit's bucket; returns how many, and when
        the next one is due if that is fewer."""
        assert self._kv is not None
        capacity = max(1.0, per_s * limits.RATE_BURST_S)
        for _ in range(8):  # compare-and-set against the other schedulers
            now = time.time()
            try:
                entry = await self._kv.get(key)
                bucket = _bucket_decoder.decode(entry.value or b"")
                revision: int | None = entry.revision
            except (KeyNotFoundError, msgspec.DecodeError):
                bucket, revision = TokenBucket(tokens=capacity, at=now), None
            tokens = min(capacity, bucket.tokens + max(0.0, now - bucket.at) * per_s)
            granted = min(wanted, int(tokens))
            due = None if granted == wanted else now + (granted + 1 - tokens) / per_s
            if granted == 0:
                return 0, due
            value = msgspec.json.encode(TokenBucket(tokens=tokens - granted, at=now))
            try:
                if revision is None:
                    await self._kv.create(key, value)
                else:
                    await self._kv.update(key, value, last=revision)
            except KeyWrongLastSequenceError:
                continue
            return granted, due
        return 0, time.time() + 1 / per_s

    async def _give_back(self, held: list[_Slot]) -> None:
        """Free the slots taken in this pass (a slot a task held already stays its own)."""
        assert self._kv is not None
        mine = [(slot.key, slot.revision) for slot in held if slot.taken_now]
        if mine:
            await limits.release(self._kv, limits.slots_header(mine))

    async def _release(self, heads: list[direct.Found], held: list[list[_Slot]], lane: _Known) -> None:
        """Publish ``heads`` onto WORK with the slots they hold, record it, and take them off their lane."""
        futures = []
        for head, slots in zip(heads, held, strict=True):
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            headers = wire.with_header(head.headers, subjects.H_MSG_ID, subjects.msg_id(task_id, "work"))
            if slots:
                headers = wire.with_header(headers, subjects.H_SLOTS, limits.slots_header([(slot.key, slot.revision) for slot in slots]))
            futures.append(await self.bus.publish(lane.work_subject, head.data, headers))
        acks = await asyncio.gather(*futures, return_exceptions=True)
        now, handled = time.time(), lane.type in self.workers.handled(lane.region)
        events: list[ev.Event] = []
        landed: list[direct.Found] = []
        for head, slots, ack in zip(heads, held, acks, strict=True):
            if isinstance(ack, BaseException):
                # Maybe stored all the same (a lost PubAck): it keeps its slots, and is admitted
                # again with them (the stream drops the copy if it was stored).
                log.warning("admitting a task onto %s failed (%r); it stays parked", lane.work_subject, ack)
                continue
            landed.append(head)
            if ack.get("duplicate"):  # admitted before (by another scheduler, or before a crash)
                await self._give_back(slots)
                continue
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            if handled:
                events.append(ev.Dispatched(task_id=task_id, at=now, region=lane.region, priority=lane.priority))
            else:
                reason = f"no worker for type {lane.type} in region {lane.region}"
                events.append(ev.Held(task_id=task_id, at=now, region=lane.region, priority=lane.priority, reason=reason))
        if events:
            await self.recorder.record(events)
        await self._delete(landed)
        self.admitted += len(events)

    async def _drop_settled(self, heads: list[direct.Found]) -> list[direct.Found]:
        """Take off their lane the parked tasks that must not be admitted: cancelled ones (with a
        ``cancelled`` event), and ones admitted before whose delete from the lane failed (their
        state is past ``waiting``: published again after the stream's duplicate window, they
        would run twice)."""
        cancelled = self.cancels.ids
        assert self._states is not None
        states = await self._states.get_many(self.bus, [wire.header_value(head.headers, subjects.H_TASK_ID) or "" for head in heads])
        events: list[ev.Event] = []
        gone: list[direct.Found] = []
        now = time.time()
        for head in heads:
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            state = states.get(task_id)
            if state is not None and state[0].status not in NOT_ADMITTED:
                gone.append(head)
            elif cancelled and task_id in cancelled:
                region = wire.header_value(head.headers, subjects.H_REGION) or ""
                events.append(ev.Cancelled(task_id=task_id, at=now, region=region, reason=cancelled[task_id]))
                gone.append(head)
        if events:
            await self.recorder.record(events)
        if gone:
            await self._delete(gone)
        return gone

    async def _delete(self, heads: list[direct.Found]) -> None:
        results = await asyncio.gather(*(direct.delete(self.bus, subjects.SCHED_STREAM, head.seq) for head in heads), return_exceptions=True)
        for result in results:
            gone = isinstance(result, APIError) and result.err_code == NO_MESSAGE_FOUND  # deleted by another scheduler
            if isinstance(result, BaseException) and not gone:
                log.warning("a task admitted from its lane was not deleted there (%r); the next pass takes it off", result)

    async def _sweep(self) -> None:
        """Free the slots of tasks whose state has been final for :data:`SWEEP_AFTER_S` (their
        workers died before freeing them, or they were cancelled while parked), looking at up
        to :data:`SWEEP_MAX` slots a time, in turn."""
        assert self._kv is not None and self._states is not None
        slots = sorted(self.taken.items())
        if not slots:
            return
        start = self._sweep_from % len(slots)
        taken = (slots[start:] + slots[:start])[:SWEEP_MAX]
        self._sweep_from = start + len(taken)
        task_ids = list({task_id for _, task_id in taken})
        states: dict[str, tuple[TaskState, int]] = {}
        for first in range(0, len(task_ids), MAX_GET_MANY):
            states.update(await self._states.get_many(self.bus, task_ids[first : first + MAX_GET_MANY]))
        settled_before = time.time() - self.sweep_after_s
        for key, task_id in taken:
            found = states.get(task_id)
            if found is None or not found[0].status.is_final or (found[0].updated_at or 0.0) > settled_before:
                continue
            try:
                entry = await self._kv.get(key)
                if entry.value and _slot_decoder.decode(entry.value).task == task_id:
                    await self._kv.delete(key, last=entry.revision)
                    log.info("freed slot %s of task %s, %s", key, task_id, found[0].status.value, extra=logs.task(task_id))
            except (KeyNotFoundError, msgspec.DecodeError):
                continue
            except APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
