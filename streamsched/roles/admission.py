"""Admission: moving tasks parked by their limits (:mod:`streamsched.roles.limits`) onto WORK.

Every regional scheduler runs one, and any of them may admit any lane: the limits are
entries in KV ``limits`` taken by compare-and-set, so two admitting at once never let more
through than a limit allows. A pass lists the lanes that hold tasks (one stream-info
request), then, highest priority first, draws lanes by lottery (weighted by their fairness
keys) and admits a chunk of each lane's oldest tasks, as many as its limits let:

1. the tasks' slots of their concurrency key, each a KV create of a free slot;
2. tokens of their rate limit, one compare-and-set of its bucket for the chunk;
3. for a fairness key, room on the WORK subject (``fairness_window`` less its durable's
   undelivered tasks);

then publishes each one admitted onto its WORK subject (headers as they were, with the msg
id ``<task>:work:0`` and the slots it holds), records ``dispatched`` (or ``held``, when no
live worker handles its type), and deletes it from its lane. A crash in between leaves it
parked with its slot taken: it is admitted again, its second WORK copy is dropped as a
duplicate (and the slots taken for it are given back), and a slot left behind is swept
once its task's state is final.

A pass runs when a task was parked here, when a slot is freed (a watch on the bucket), when
a rate limit's next token is due, and every :data:`TICK_S` (for tasks parked by other
schedulers, and for fair lanes waiting for room on WORK: :data:`FAIR_TICK_S`).
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

from .. import subjects
from ..config import Settings
from ..eventlog import events as ev
from ..eventlog.recorder import EventRecorder
from ..eventlog.state import MAX_GET_MANY, StateStore
from ..model import TaskState
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
#: Slots looked up in one sweep at most.
SWEEP_MAX = 2000
#: How long the slots held at the start may take to load.
LOAD_TIMEOUT_S = 10.0

#: JetStream's error code for a message that is not (or no longer) stored.
NO_MESSAGE_FOUND = 10057

_slot_decoder = msgspec.json.Decoder(SlotValue)
_bucket_decoder = msgspec.json.Decoder(TokenBucket)


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
        self._gates: dict[str, Gates | None] = {}  # by lane subject
        self._weights: dict[str, float] = {}  # by lane subject
        self._kv: KeyValue | None = None
        self._states: StateStore | None = None

    def wake(self) -> None:
        """Run a pass soon: a task was parked, or a slot freed."""
        self._woken.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._woken.set()

    async def run(self) -> None:
        self._kv = await self.bus.js.key_value(subjects.LIMITS_BUCKET)
        self._states = await StateStore.open(self.bus)
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
                    if learned.fair_waiting:
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
            levels.setdefault(level, []).append(_Lane(subject, priority, parked, self._weights.get(subject, 1.0)))
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
        return learned

    async def _admit(self, lane: _Lane, count: int, learned: _Pass) -> int:
        """Admit up to ``count`` of the lane's oldest tasks; returns how many left it."""
        heads = await direct.next_on_subject(self.bus, subjects.SCHED_STREAM, lane.subject, 1, count)
        if not heads:
            return 0
        first = heads[0].headers
        task_type = wire.header_value(first, subjects.H_TYPE) or ""
        region = wire.header_value(first, subjects.H_REGION) or ""
        if lane.subject not in self._gates:
            if len(self._gates) > 10_000:
                self._gates.clear()
            self._gates[lane.subject] = limits.gates(self.settings, task_type, wire.header_value(first, subjects.H_LIMITS))
        gates = self._gates[lane.subject]
        lane.weight = self._weights[lane.subject] = gates.weight if gates is not None else 1.0
        gone = await self._drop_cancelled(heads)
        heads = [head for head in heads if head not in gone]
        if not heads:
            return len(gone)
        work_subject = subjects.work(region, lane.priority, task_type)
        room = len(heads)
        if gates is not None and gates.fair:
            room = min(room, await self._room(learned, region, lane.priority, task_type, work_subject))
            if room <= 0:
                learned.fair_waiting = True
                return len(gone)
        held: list[list[tuple[str, int]]] = []
        chosen = heads[:room]
        if gates is not None and gates.slots is not None:
            chosen, held = await self._take_slots(gates.slots, chosen)
        if gates is not None and gates.rate is not None and chosen:
            granted, due = await self._take_tokens(*gates.rate, len(chosen))
            if due is not None:
                learned.token_due = due if learned.token_due is None else min(learned.token_due, due)
            if granted < len(chosen):
                await self._give_back([slot for slots in held[granted:] for slot in slots])
                chosen, held = chosen[:granted], held[:granted]
        if not chosen:
            return len(gone)
        await self._release(chosen, held or [[] for _ in chosen], region, lane.priority, task_type, work_subject)
        if gates is not None and gates.fair:
            learned.room[work_subject] -= len(chosen)
        return len(gone) + len(chosen)

    async def _room(self, learned: _Pass, region: str, priority: str, task_type: str, work_subject: str) -> int:
        """How many more fair tasks ``work_subject`` takes now: ``fairness_window`` less what waits there undelivered."""
        if work_subject not in learned.room:
            try:
                info = await self.bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(region, priority, task_type))
                waiting = info.num_pending
            except NotFoundError:  # no worker has made the durable yet: what the subject holds waits
                stream = await self.bus.js.stream_info(subjects.WORK_STREAM, subjects_filter=work_subject)
                waiting = (stream.state.subjects or {}).get(work_subject, 0)
            learned.room[work_subject] = self.settings.fairness_window - waiting
        return learned.room[work_subject]

    async def _take_slots(self, slots: SlotSet, heads: list[direct.Found]) -> tuple[list[direct.Found], list[list[tuple[str, int]]]]:
        """Each of ``heads`` that got a free slot (one KV create each, all at once), with its slot."""
        assert self._kv is not None
        free = [key for key in (f"{slots.prefix}.{i}" for i in range(slots.limit)) if key not in self.taken][: len(heads)]
        heads = heads[: len(free)]

        async def take(key: str, head: direct.Found) -> int | None:
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            assert self._kv is not None
            try:
                revision = await self._kv.create(key, msgspec.json.encode(SlotValue(task_id)))
            except KeyWrongLastSequenceError:
                return None  # taken meanwhile (by another scheduler)
            self.taken[key] = task_id
            return revision

        revisions = await asyncio.gather(*(take(key, head) for key, head in zip(free, heads, strict=True)))
        chosen = [(head, [(key, revision)]) for key, head, revision in zip(free, heads, revisions, strict=True) if revision is not None]
        return [head for head, _ in chosen], [slot for _, slot in chosen]

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

    async def _give_back(self, held: list[tuple[str, int]]) -> None:
        assert self._kv is not None
        if held:
            await limits.release(self._kv, limits.slots_header(held))

    async def _release(
        self, heads: list[direct.Found], held: list[list[tuple[str, int]]], region: str, priority: str, task_type: str, work_subject: str
    ) -> None:
        """Publish ``heads`` onto WORK with the slots they hold, record it, and take them off their lane."""
        futures = []
        for head, slots in zip(heads, held, strict=True):
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            headers = wire.with_header(head.headers, subjects.H_MSG_ID, subjects.msg_id(task_id, "work"))
            if slots:
                headers = wire.with_header(headers, subjects.H_SLOTS, limits.slots_header(slots))
            futures.append(await self.bus.publish(work_subject, head.data, headers))
        acks = await asyncio.gather(*futures, return_exceptions=True)
        now, handled = time.time(), task_type in self.workers.handled(region)
        events: list[ev.Event] = []
        landed: list[direct.Found] = []
        for head, slots, ack in zip(heads, held, acks, strict=True):
            if isinstance(ack, BaseException):
                log.warning("admitting a task onto %s failed (%r); it stays parked", work_subject, ack)
                await self._give_back(slots)
                continue
            landed.append(head)
            if ack.get("duplicate"):  # admitted before (by another scheduler, or before a crash)
                await self._give_back(slots)
                continue
            task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
            if handled:
                events.append(ev.Dispatched(task_id=task_id, at=now, region=region, priority=priority))
            else:
                reason = f"no worker for type {task_type} in region {region}"
                events.append(ev.Held(task_id=task_id, at=now, region=region, priority=priority, reason=reason))
        if events:
            await self.recorder.record(events)
        await self._delete(landed)
        self.admitted += len(events)

    async def _drop_cancelled(self, heads: list[direct.Found]) -> list[direct.Found]:
        """Record ``cancelled`` for the parked tasks that were cancelled, and take them off their lane."""
        cancelled = self.cancels.ids
        if not cancelled:
            return []
        gone = [head for head in heads if (wire.header_value(head.headers, subjects.H_TASK_ID) or "") in cancelled]
        if gone:
            now = time.time()
            events: list[ev.Event] = []
            for head in gone:
                task_id = wire.header_value(head.headers, subjects.H_TASK_ID) or ""
                region = wire.header_value(head.headers, subjects.H_REGION) or ""
                events.append(ev.Cancelled(task_id=task_id, at=now, region=region, reason=cancelled[task_id]))
            await self.recorder.record(events)
            await self._delete(gone)
        return gone

    async def _delete(self, heads: list[direct.Found]) -> None:
        results = await asyncio.gather(*(direct.delete(self.bus, subjects.SCHED_STREAM, head.seq) for head in heads), return_exceptions=True)
        for result in results:
            gone = isinstance(result, APIError) and result.err_code == NO_MESSAGE_FOUND  # deleted by another scheduler
            if isinstance(result, BaseException) and not gone:
                log.warning("a task admitted from its lane was not deleted there (%r); it is admitted again and dropped as a duplicate", result)

    async def _sweep(self) -> None:
        """Free the slots whose tasks' states are final (their workers died before freeing them)."""
        assert self._kv is not None and self._states is not None
        taken = list(self.taken.items())[:SWEEP_MAX]
        if not taken:
            return
        task_ids = list({task_id for _, task_id in taken})
        states: dict[str, tuple[TaskState, int]] = {}
        for start in range(0, len(task_ids), MAX_GET_MANY):
            states.update(await self._states.get_many(self.bus, task_ids[start : start + MAX_GET_MANY]))
        for key, task_id in taken:
            found = states.get(task_id)
            if found is None or not found[0].status.is_final:
                continue
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value and _slot_decoder.decode(entry.value).task == task_id:
                with contextlib.suppress(KeyWrongLastSequenceError):
                    await self._kv.delete(key, last=entry.revision)
                    log.info("freed slot %s of finished task %s", key, task_id)
