"""Tasks that wait for other tasks (``depends_on``): registration, release, cancellation, timeout.

A submission with dependencies is *registered*, not placed (by the master's intake,
:meth:`Dependencies.register`):

1. its record goes into KV ``waiting`` (key = task id): the task as it will be placed,
   the dependencies still unmet, its policy and its timeout;
2. one edge per dependency goes into KV ``dependants`` (``<dependency>.<dependant>``), so
   a finished task finds what waits for it with one wildcard lookup;
3. then it *re-checks*: the dependencies' states are read from KV ``tasks`` and each one
   already final is resolved as below.

The *completer* is the projector: after a write batch has landed, it hands the tasks whose
state is now final to :meth:`Dependencies.resolve`, which looks up their edges (one
batched direct get per batch, for every task of it), reads the waiting records the edges
name (one more), and resolves each edge with a compare-and-set on the record's revision:
the dependency leaves ``unmet``; the write that empties it releases the task (placed,
``scheduled`` event); a dependency that ended failed, dead, cancelled or rejected cancels
the task under the ``cancel`` policy (a ``cancelled`` event naming it, whose own
dependants then cascade the same way) and counts as met under ``run``.

Race-freeness: the registrant writes the edge *before* it reads the dependency's state,
and the completer looks up edges *after* the final state is written. So whichever comes
second sees the other's write: at least one of them resolves the edge (both may, which is
why every step is idempotent: ``unmet`` is a set, the placement dedupes by ``Nats-Msg-Id``,
and a record marked done ignores further edges).

Nothing lives in a process: a crash anywhere redoes the step from its un-acked message
(the submission, or the projector's event message, acked only after resolution landed).
A record is never deleted but marked done, so a redelivered submission finds it and does
not register the task again; the buckets expire with the events (``events_max_age_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import msgspec
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from .. import subjects
from ..config import Settings
from ..errors import Rejected
from ..eventlog import events as ev
from ..eventlog.recorder import EventRecorder
from ..eventlog.state import MAX_GET_MANY, StateStore, last_values
from ..model import Envelope, Status, TaskState
from ..transport.bus import Bus
from ..transport.reading import Since, read
from .placement import ReadyTask, place, rfc3339

log = logging.getLogger("streamsched.dependencies")

#: ``on_dependency_failure`` values.
POLICIES = ("cancel", "run")
#: Most dependencies one task may name.
MAX_DEPENDENCIES = 1024
#: Compare-and-set rounds on one waiting record before the step fails (and is redone).
CAS_ROUNDS = 20
#: Filters in one batched direct get (the server takes at most 1,024).
MAX_FILTERS = MAX_GET_MANY
#: What a record is once it stops waiting.
WAITING, RELEASED, CANCELLED = "waiting", "released", "cancelled"


class WaitingRecord(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The value of KV ``waiting.<task id>``."""

    task: ReadyTask
    """The task as it is placed when released (its body is the submission's JSON)."""
    depends_on: list[str]
    unmet: list[str]
    """Dependencies not yet final (kept in ``depends_on`` order)."""
    policy: str = "cancel"
    timeout_s: float
    since: float
    state: str = WAITING
    """``waiting``, then ``released`` or ``cancelled`` (written before it is acted on)."""
    reason: str = ""
    """Why it was cancelled."""
    acted: bool = False
    """The release or cancellation was carried out (placed or recorded)."""
    split: bool = False
    """The gather task of a split (its dependencies are its chunks): records ``progress`` as
    they finish, and ends ``failed`` (not ``cancelled``) when one does not succeed."""
    collect: bool = False
    """A split without a gather type: released, it succeeds with the list of chunk results."""


_record_decoder = msgspec.json.Decoder(WaitingRecord)


def check(envelope: Envelope, settings: Settings) -> None:
    """The master's checks of the dependency fields; raises :class:`Rejected` with the reason."""
    if envelope.dependency_results is not None:
        raise Rejected("`dependency_results` is filled in by the scheduler, not by a submitter")
    if not envelope.depends_on:
        return
    if len(envelope.depends_on) > MAX_DEPENDENCIES:
        raise Rejected(f"`depends_on` names {len(envelope.depends_on)} tasks, over the limit of {MAX_DEPENDENCIES}")
    for dependency in envelope.depends_on:
        if not subjects.is_token(dependency):
            raise Rejected(f"`depends_on` id {dependency!r} is not subject-safe (1-128 characters of A-Z a-z 0-9 _ -)")
        if dependency == envelope.id:
            raise Rejected(f"task {dependency} cannot depend on itself")
    if envelope.on_dependency_failure not in POLICIES:
        raise Rejected(f"`on_dependency_failure` must be one of {', '.join(POLICIES)}, not {envelope.on_dependency_failure!r}")
    timeout = envelope.dependency_timeout_s
    if timeout is not None and not 0 < timeout <= settings.events_max_age_s:
        raise Rejected(f"`dependency_timeout_s` must be positive and at most {settings.events_max_age_s:g} (events_max_age_s)")


def with_results(body: bytes, results: dict[str, msgspec.Raw | None]) -> bytes:
    """The submission JSON ``body`` with ``dependency_results`` added (raw results spliced in,
    never decoded; the master refuses a submission that sets the field itself)."""
    return body[:-1].rstrip() + b',"dependency_results":' + msgspec.json.encode(results) + b"}"


class Dependencies:
    """Registers waiting tasks and resolves their edges; one per master and per projector."""

    def __init__(self, settings: Settings, bus: Bus, *, source: str) -> None:
        self.settings = settings
        self.bus = bus
        self.recorder = EventRecorder(bus, source)
        self._waiting: KeyValue | None = None
        self._dependants: KeyValue | None = None
        self._tasks: StateStore | None = None
        self._stopping = asyncio.Event()

    async def _open(self) -> tuple[KeyValue, KeyValue, StateStore]:
        if self._waiting is None or self._dependants is None or self._tasks is None:
            self._waiting = await self.bus.js.key_value(subjects.WAITING_BUCKET)
            self._dependants = await self.bus.js.key_value(subjects.DEPENDANTS_BUCKET)
            self._tasks = await StateStore.open(self.bus)
        return self._waiting, self._dependants, self._tasks

    # -- registration (the master's intake) ---------------------------------------------------

    async def register(self, task: ReadyTask, envelope: Envelope, now: float, *, split: bool = False, collect: bool = False) -> list[ev.Event]:
        """Register ``task`` as waiting for ``envelope.depends_on``; returns its ``waiting`` event
        (its release or cancellation, when the re-check finds it due, is recorded separately).
        ``split`` and ``collect`` mark the gather task of a split (see :class:`WaitingRecord`)."""
        waiting, dependants, tasks = await self._open()
        depends_on = list(dict.fromkeys(envelope.depends_on))
        timeout = envelope.dependency_timeout_s or self.settings.dependency_timeout_s
        record = WaitingRecord(
            task=task,
            depends_on=depends_on,
            unmet=depends_on,
            policy=envelope.on_dependency_failure,
            timeout_s=timeout,
            since=now,
            split=split,
            collect=collect,
        )
        with contextlib.suppress(KeyWrongLastSequenceError):  # there already: a redelivery goes on
            await waiting.create(task.id, msgspec.json.encode(record))
        await self._schedule_timeout(task.id, now + timeout)
        await asyncio.gather(*(self._create_edge(dependants, dependency, task.id) for dependency in depends_on))
        # The re-check: a dependency that became final before its edge existed was missed by the completer.
        finished = await self._states(tasks, depends_on)
        await self.resolve({d: state for d, state in finished.items() if state.status.is_final})
        return [ev.Waiting(task_id=task.id, at=now, region=task.region, on=depends_on)]

    @staticmethod
    async def _create_edge(dependants: KeyValue, dependency: str, dependant: str) -> None:
        with contextlib.suppress(KeyWrongLastSequenceError):
            await dependants.create(subjects.edge_key(dependency, dependant), b"")

    async def _schedule_timeout(self, task_id: str, at: float) -> None:
        headers = {
            "Nats-Schedule": f"@at {rfc3339(at)}",
            "Nats-Schedule-Target": subjects.DEPS_DUE,
            subjects.H_TASK_ID: task_id,
        }
        await self.bus.js.publish(subjects.dependency_timer(task_id), task_id.encode(), headers=headers)

    async def _states(self, tasks: StateStore, task_ids: Sequence[str]) -> dict[str, TaskState]:
        found: dict[str, TaskState] = {}
        for start in range(0, len(task_ids), MAX_GET_MANY):
            got = await tasks.get_many(self.bus, task_ids[start : start + MAX_GET_MANY])
            found.update((task_id, state) for task_id, (state, _revision) in got.items())
        return found

    # -- resolution (the completer, and the registrant's re-check) ------------------------------

    async def resolve(self, finished: dict[str, TaskState]) -> None:
        """Resolve every edge from the final tasks in ``finished`` (id -> final state)."""
        if not finished:
            return
        waiting, _dependants, _tasks = await self._open()
        by_dependant: dict[str, list[str]] = defaultdict(list)
        for dependency, dependant in await self._edges(finished):
            by_dependant[dependant].append(dependency)
        if not by_dependant:
            return
        records = await self._records(list(by_dependant))
        outcomes = await asyncio.gather(
            *(
                self._resolve_one(waiting, dependant, {d: finished[d] for d in deps}, records.get(dependant))
                for dependant, deps in by_dependant.items()
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _edges(self, dependencies: Iterable[str]) -> list[tuple[str, str]]:
        """``(dependency, dependant)`` of every edge from ``dependencies``."""
        prefix = f"$KV.{subjects.DEPENDANTS_BUCKET}."
        filters = [f"{prefix}{dependency}.*" for dependency in dependencies]
        edges: list[tuple[str, str]] = []
        for start in range(0, len(filters), MAX_FILTERS):
            for subject in await self._matching(f"KV_{subjects.DEPENDANTS_BUCKET}", filters[start : start + MAX_FILTERS]):
                dependency, _, dependant = subject[len(prefix) :].partition(".")
                edges.append((dependency, dependant))
        return edges

    async def _matching(self, stream: str, filters: list[str]) -> list[str]:
        """Subjects with a live last value under ``filters``: one direct get; halved when the
        server finds too many (over 1,024) matches, and read from the stream for one filter."""
        try:
            found = await last_values(self.bus, stream, filters)
        except APIError as exc:
            if exc.code != 413:
                raise
            if len(filters) > 1:
                half = len(filters) // 2
                return await self._matching(stream, filters[:half]) + await self._matching(stream, filters[half:])
            return await self._read_live(stream, filters[0])
        if found is None:
            raise RuntimeError(f"stream {stream} answers no direct gets (apply the stream configs)")
        return [subject for subject, _seq, _data in found]

    async def _read_live(self, stream: str, subject_filter: str) -> list[str]:
        live: dict[str, bool] = {}
        async for stored in read(self.bus, stream, subject_filter, Since(seq=1)):
            live[stored.subject] = stored.headers.get("KV-Operation") not in ("DEL", "PURGE")
        return [subject for subject, alive in live.items() if alive]

    async def _records(self, task_ids: list[str]) -> dict[str, tuple[WaitingRecord, int]]:
        """The waiting records (and revisions) of ``task_ids``, batched."""
        prefix = f"$KV.{subjects.WAITING_BUCKET}."
        records: dict[str, tuple[WaitingRecord, int]] = {}
        for start in range(0, len(task_ids), MAX_FILTERS):
            chunk = [prefix + task_id for task_id in task_ids[start : start + MAX_FILTERS]]
            found = await last_values(self.bus, f"KV_{subjects.WAITING_BUCKET}", chunk)
            for subject, revision, data in found or ():
                records[subject[len(prefix) :]] = (_record_decoder.decode(data), revision)
        return records

    async def _read_record(self, waiting: KeyValue, task_id: str) -> tuple[WaitingRecord, int] | None:
        try:
            entry = await waiting.get(task_id)
        except (NotFoundError, KeyError):
            return None
        if entry.value is None:
            return None
        return _record_decoder.decode(entry.value), entry.revision or 0

    async def _resolve_one(
        self,
        waiting: KeyValue,
        task_id: str,
        finished: dict[str, TaskState],
        entry: tuple[WaitingRecord, int] | None,
    ) -> None:
        """Take the final ``finished`` dependencies off one waiting record, and act on what is left."""

        def decide(record: WaitingRecord) -> bool:
            failing = [d for d in record.unmet if d in finished and finished[d].status is not Status.SUCCEEDED]
            if failing and record.policy == "cancel":
                record.state = CANCELLED
                what = "chunk" if record.split else "dependency"
                record.reason = f"{what} {failing[0]} ended {finished[failing[0]].status.value}"
                return True
            unmet = [d for d in record.unmet if d not in finished]
            if unmet == record.unmet:
                return False
            record.unmet = unmet
            if not unmet:
                record.state = RELEASED
            return True

        await self._transition(waiting, task_id, entry, decide)

    async def _transition(
        self,
        waiting: KeyValue,
        task_id: str,
        entry: tuple[WaitingRecord, int] | None,
        decide: Callable[[WaitingRecord], bool],
    ) -> None:
        """Change a waiting record with ``decide`` (True when it changed it) by compare-and-set,
        re-reading on a conflict; once it stops waiting, act on it (place or cancel).

        The change that ends the wait is written before it is acted on, so of two resolvers
        only the winner acts; a record found ended but not yet acted on (its resolver
        crashed, and this is the redelivery) is acted on again: both acts are idempotent."""
        after_conflict = False
        for _ in range(CAS_ROUNDS):
            if entry is None:  # not registered (an edge outlived its record) or expired
                return
            record, revision = entry
            if record.state != WAITING:
                if not record.acted and not after_conflict:  # else the writer that just won acts
                    await self._act(waiting, record, revision)
                return
            if not decide(record):
                return
            try:
                revision = await waiting.update(task_id, msgspec.json.encode(record), last=revision)
            except KeyWrongLastSequenceError:
                entry = await self._read_record(waiting, task_id)
                after_conflict = True
                continue
            if record.split and record.state != CANCELLED:
                await self._record_progress(record)
            if record.state != WAITING:
                await self._act(waiting, record, revision)
            return
        raise RuntimeError(f"waiting record of {task_id} kept changing; resolving it again later")

    async def _record_progress(self, record: WaitingRecord) -> None:
        """The share of a split's chunks done, as ``progress`` of its gather task."""
        total = len(record.depends_on)
        done = total - len(record.unmet)
        progress = ev.Progress(
            task_id=record.task.id,
            at=time.time(),
            region=record.task.region,
            fraction=done / total,
            message=f"{done} of {total} chunks done",
        )
        await self.recorder.record([progress])

    async def _act(self, waiting: KeyValue, record: WaitingRecord, revision: int) -> None:
        """Carry out an ended wait: place the released task with its dependencies' results (or
        fail it when they make it too big), or cancel it; then mark the record acted on."""
        task = record.task
        now = time.time()
        event: ev.Event
        if record.state == CANCELLED and record.split:
            event = ev.Failed(task_id=task.id, at=now, region=task.region, error=record.reason)
        elif record.state == CANCELLED:
            event = ev.Cancelled(task_id=task.id, at=now, region=task.region, reason=record.reason)
        else:
            _, _, tasks = await self._open()
            states = await self._states(tasks, record.depends_on)
            results: dict[str, msgspec.Raw | None] = {}
            for dependency in record.depends_on:
                result = states[dependency].result if dependency in states else msgspec.UNSET
                results[dependency] = None if isinstance(result, msgspec.UnsetType) else result
            body = with_results(task.body, results)
            if record.collect:  # a split without a gather type: its result is the chunks' results
                listed = b"[" + b",".join(b"null" if r is None else bytes(r) for r in results.values()) + b"]"
                event = ev.Succeeded(task_id=task.id, at=now, region=task.region, result=msgspec.Raw(listed))
            elif len(body) > self.settings.max_payload_bytes:
                error = f"the results of its dependencies make its body {len(body)} bytes, over max_payload_bytes ({self.settings.max_payload_bytes})"
                event = ev.Failed(task_id=task.id, at=now, region=task.region, error=error)
            else:
                await place(self.bus, [msgspec.structs.replace(task, body=body)], now=now)
                if task.is_delayed(now):
                    event = ev.Waiting(task_id=task.id, at=now, region=task.region, until=task.run_at)
                else:
                    event = ev.Scheduled(task_id=task.id, at=now, region=task.region, priority=task.priority)
        await self.recorder.record([event])
        record.acted = True
        with contextlib.suppress(KeyWrongLastSequenceError):  # another resolver acted on it too
            await waiting.update(task.id, msgspec.json.encode(record), last=revision)
        with contextlib.suppress(Exception):  # best effort: a timeout firing for an ended wait does nothing
            await self.bus.js.purge_stream(subjects.TIMERS_STREAM, subject=subjects.dependency_timer(task.id))

    # -- cancellation (a master's canceller) ------------------------------------------------------

    async def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel ``task_id`` if it waits for dependencies; True when it was waiting.

        The record is marked (``cancelled``, then acted on: the ``cancelled`` event, whose
        dependants cascade), never deleted, so a redelivered submission does not register
        the task again and a resolver racing this one loses its compare-and-set."""
        waiting, _, _ = await self._open()
        was_waiting = False

        def decide(record: WaitingRecord) -> bool:
            nonlocal was_waiting
            was_waiting = True
            record.state = CANCELLED
            record.reason = reason
            record.split = False  # a split's gather task cancelled on request ends cancelled, not failed
            return True

        await self._transition(waiting, task_id, await self._read_record(waiting, task_id), decide)
        return was_waiting

    # -- timeouts ------------------------------------------------------------------------------

    async def run_timeouts(self) -> None:
        """Read the dependency timeouts that fired and cancel the tasks still waiting."""
        waiting, _, _ = await self._open()
        subscription = await self.bus.js.pull_subscribe_bind(subjects.DEPS_TIMEOUT_CONSUMER, stream=subjects.TIMERS_STREAM)
        try:
            while not self._stopping.is_set():
                try:
                    messages = await subscription.fetch(32, timeout=0.5)
                except TimeoutError:
                    continue
                except Exception as exc:  # noqa: BLE001 - a broker outage: the next fetch retries
                    log.debug("fetching dependency timeouts failed: %r", exc)
                    await asyncio.sleep(0.5)
                    continue
                for message in messages:
                    try:
                        await self._time_out(waiting, message.data.decode())
                    except Exception as exc:  # noqa: BLE001 - comes back after a short delay
                        log.warning("dependency timeout of %r not handled yet (%r)", message.data[:200], exc)
                        await message.nak(delay=1.0)
                        continue
                    await message.ack()
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    def stop(self) -> None:
        self._stopping.set()

    async def _time_out(self, waiting: KeyValue, task_id: str) -> None:
        def decide(record: WaitingRecord) -> bool:
            if not record.unmet:
                return False
            record.state = CANCELLED
            record.reason = f"dependency {', '.join(record.unmet)} not finished within {record.timeout_s:g} s"
            return True

        await self._transition(waiting, task_id, await self._read_record(waiting, task_id), decide)
