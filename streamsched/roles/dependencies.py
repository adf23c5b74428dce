"""Tasks that wait for other tasks (``depends_on``): registration, release, cancellation, timeout.

A submission with dependencies is *registered*, not placed (by the master's intake,
:meth:`Dependencies.register`):

1. its record goes into KV ``waiting`` (key = task id): the task as it will be placed,
   the dependencies still unmet, its policy and its timeout;
2. one edge per dependency goes into KV ``dependants`` (``<dependency>.<dependant>``), so
   a finished task finds what waits for it with one wildcard lookup;
3. then it *re-checks*: the dependencies' states are read from KV ``tasks`` and each one
   already final is resolved as below.

The *completer* is a master's resolver (:mod:`streamsched.roles.resolver`): after a write
batch has landed, the projector names the tasks whose state is now final in a notice, and
:meth:`Dependencies.resolve` looks up their edges (one batched direct get per notice),
reads the waiting records the edges name (one more; none for the records this process
wrote last, which it keeps as written, see :class:`RecentRecords`), and resolves each
edge with a compare-and-set on the record's revision:
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
(the submission, or the notice, acked only after its resolution landed).
A record is never deleted but marked done, so a redelivered submission finds it and does
not register the task again; the buckets expire with the events (``events_max_age_s``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import msgspec
from nats.js.errors import APIError

from .. import subjects
from ..config import Settings
from ..errors import Rejected
from ..eventlog import events as ev
from ..eventlog.recorder import EventRecorder
from ..eventlog.state import COMPARE_AND_SET, MAX_GET_MANY, WRONG_LAST_SEQUENCE, StateStore, last_values
from ..model import Envelope, Status, TaskState
from ..transport.bus import Bus
from ..transport.reading import Since, read
from .placement import ReadyTask, at_schedule, place
from .ticks import TickBatch

log = logging.getLogger("streamsched.dependencies")

#: ``on_dependency_failure`` values.
POLICIES = ("cancel", "run")
#: Most dependencies one task may name.
MAX_DEPENDENCIES = 1024
#: Compare-and-set rounds on one waiting record before the step fails (and is redone).
CAS_ROUNDS = 20
#: Filters in one batched direct get (the server takes at most 1,024).
MAX_FILTERS = MAX_GET_MANY
#: Registrations written and re-checked together at most (their publishes stay well
#: inside the connection's in-flight window).
REGISTRATIONS_AT_ONCE = 256
#: What a record is once it stops waiting.
WAITING, RELEASED, CANCELLED = "waiting", "released", "cancelled"
#: Waiting records a process keeps as it last wrote them (see :class:`RecentRecords`), at
#: most, and the bytes of their task bodies at most.
RECENT_RECORDS = 4096
RECENT_BYTES = 32 * 2**20


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


class RecentRecords:
    """The waiting records this process wrote last, each with the revision it wrote.

    A master resolves the tasks it registered itself: with the record at hand, the
    compare-and-set that resolves an edge goes out without reading the record first, one
    round trip less between a dependency's success and its dependant's start. The copy
    decides nothing on its own: a record changed since by another writer (another master,
    a canceller) fails that compare-and-set, and is read and decided again as after any
    lost write. Bounded in count and in body bytes, oldest first out."""

    def __init__(self, max_records: int = RECENT_RECORDS, max_bytes: int = RECENT_BYTES) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, tuple[WaitingRecord, int]] = collections.OrderedDict()
        self._bytes = 0

    def keep(self, record: WaitingRecord, revision: int) -> None:
        """Remember ``record`` as written at ``revision``, while it waits (an ended wait is not resolved again)."""
        self.take(record.task.id)
        if record.state != WAITING:
            return
        self._entries[record.task.id] = (record, revision)
        self._bytes += len(record.task.body)
        while len(self._entries) > self.max_records or self._bytes > self.max_bytes:
            _, (oldest, _revision) = self._entries.popitem(last=False)
            self._bytes -= len(oldest.task.body)

    def take(self, task_id: str) -> tuple[WaitingRecord, int] | None:
        """The record of ``task_id`` as last written here, taken out (the caller changes it, and
        keeps it again once its write landed); None when not at hand."""
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            self._bytes -= len(entry[0].task.body)
        return entry


#: ``(subject, body, header block)`` of a raw publish.
Publication = tuple[str, bytes, bytes | None]
#: Headers that remove a schedule: an empty message rolls up its subject (the schedule goes)
#: and expires itself a second later. A purge request per task would cost about three
#: times the server's CPU, and a request's round trip.
_UNSCHEDULE = b"NATS/1.0\r\nNats-Rollup: sub\r\nNats-TTL: 1s\r\n\r\n"


def _kv_subject(bucket: str, key: str) -> str:
    return f"$KV.{bucket}.{key}"


def _decide(record: WaitingRecord, finished: dict[str, Status]) -> bool:
    """Take the ``finished`` dependencies off ``record``; True when that changed it.

    A dependency that did not succeed cancels the task under the ``cancel`` policy (a split's
    gather task then fails); the change that leaves nothing unmet releases it."""
    failing = [d for d in record.unmet if d in finished and finished[d] is not Status.SUCCEEDED]
    if failing and record.policy == "cancel":
        record.state = CANCELLED
        what = "chunk" if record.split else "dependency"
        record.reason = f"{what} {failing[0]} ended {finished[failing[0]].value}"
        return True
    unmet = [d for d in record.unmet if d not in finished]
    if unmet == record.unmet:
        return False
    record.unmet = unmet
    if not unmet:
        record.state = RELEASED
    return True


def _split_progress(record: WaitingRecord) -> ev.Event:
    """The share of a split's chunks done, as ``progress`` of its gather task."""
    total = len(record.depends_on)
    done = total - len(record.unmet)
    return ev.Progress(
        task_id=record.task.id, at=time.time(), region=record.task.region, fraction=done / total, message=f"{done} of {total} chunks done"
    )


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
    """Registers waiting tasks and resolves their edges; one in each master's intake (its resolver shares it) and one in its canceller."""

    def __init__(self, settings: Settings, bus: Bus, *, source: str) -> None:
        self.settings = settings
        self.bus = bus
        self.recorder = EventRecorder(bus, source, settings.projector_partitions)
        self._tasks: StateStore | None = None
        self._registrations = TickBatch(self._register_all, max_items=REGISTRATIONS_AT_ONCE)
        self.recent = RecentRecords()

    async def _task_states(self) -> StateStore:
        if self._tasks is None:
            self._tasks = await StateStore.open(self.bus)
        return self._tasks

    # -- registration (the master's intake) ---------------------------------------------------

    async def register(
        self, task: ReadyTask, envelope: Envelope, now: float, *, since: float | None = None, split: bool = False, collect: bool = False
    ) -> list[ev.Event]:
        """Register ``task`` as waiting for ``envelope.depends_on``; returns its ``waiting`` event
        (its release or cancellation, when the re-check finds it due, is recorded separately).
        ``since`` is when the wait began, from which the timeout counts (the submission's
        stored time, so a redelivery does not push it back; ``now`` when not given).
        ``split`` and ``collect`` mark the gather task of a split (see :class:`WaitingRecord`).
        The registrations of one loop tick are written and re-checked together."""
        depends_on = list(dict.fromkeys(envelope.depends_on))
        timeout = envelope.dependency_timeout_s or self.settings.dependency_timeout_s
        record = WaitingRecord(
            task=task,
            depends_on=depends_on,
            unmet=depends_on,
            policy=envelope.on_dependency_failure,
            timeout_s=timeout,
            since=now if since is None else since,
            split=split,
            collect=collect,
        )
        await self._registrations.add(record)
        return [ev.Waiting(task_id=task.id, at=now, region=task.region, on=depends_on)]

    async def _register_all(self, records: list[WaitingRecord]) -> None:
        """Write the records, their timeout schedules and their edges in one go, then re-check."""
        publications: list[Publication] = []
        record_at: list[int] = []  # where each record's write is among the publications
        for record in records:
            task_id = record.task.id
            # Created only if absent: one already there is a redelivered submission's, and goes on.
            record_at.append(len(publications))
            publications.append((_kv_subject(subjects.WAITING_BUCKET, task_id), msgspec.json.encode(record), COMPARE_AND_SET % 0))
            timeout = b"NATS/1.0\r\n" + at_schedule(record.since + record.timeout_s, subjects.DEPS_DUE) + b"\r\n"
            publications.append((subjects.dependency_timer(task_id), task_id.encode(), timeout))
            for dependency in record.depends_on:
                publications.append((_kv_subject(subjects.DEPENDANTS_BUCKET, subjects.edge_key(dependency, task_id)), b"", None))
        sequences = await self._publish(publications)
        for record, at in zip(records, record_at, strict=True):
            if (sequence := sequences[at]) is not None:  # None: a redelivered submission's, written before
                self.recent.keep(record, sequence)
        # The re-check: a dependency that became final before its edge existed was missed by
        # the completer. Only these records' own edges: a hub's other dependants are not ours.
        dependencies = list(dict.fromkeys(d for record in records for d in record.depends_on))
        states = await self._states(dependencies)
        finished = {d: state.status for d, state in states.items() if state.status.is_final}
        by_dependant = {r.task.id: [d for d in r.depends_on if d in finished] for r in records}
        await self._resolve_dependants({t: deps for t, deps in by_dependant.items() if deps}, finished, states)

    async def _publish(self, publications: Sequence[Publication]) -> list[int | None]:
        """Publish each and wait for all; the stream sequence of each, or ``None`` for a
        compare-and-set that found another revision. Raises on any other failure."""
        if not publications:
            return []
        gathering = await self.bus.publish_gathered(publications)
        await gathering.done
        sequences: list[int | None] = []
        for result in gathering.results:
            if isinstance(result, APIError) and result.err_code == WRONG_LAST_SEQUENCE:
                sequences.append(None)
            elif isinstance(result, BaseException):
                raise result
            else:
                assert isinstance(result, dict)
                sequences.append(int(result["seq"]))
        return sequences

    async def _states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        tasks = await self._task_states()
        chunks = [task_ids[start : start + MAX_GET_MANY] for start in range(0, len(task_ids), MAX_GET_MANY)]
        found: dict[str, TaskState] = {}
        for got in await asyncio.gather(*(tasks.get_many(self.bus, chunk) for chunk in chunks)):
            found.update((task_id, state) for task_id, (state, _revision) in got.items())
        return found

    # -- resolution (the completer, and the registrant's re-check) ------------------------------

    async def resolve(self, finished: dict[str, Status], known: dict[str, TaskState] | None = None) -> None:
        """Resolve every edge from the final tasks in ``finished`` (id -> final status): the
        edges found with one lookup, the records read with another, all changes written
        together by compare-and-set (those that lost to another writer read again and
        decided again), and what ended carried out together. The results a released task
        carries are read while its change is written; ``known`` holds states at hand."""
        if not finished:
            return
        by_dependant: dict[str, list[str]] = defaultdict(list)
        for dependency, dependant in await self._edges(finished):
            by_dependant[dependant].append(dependency)
        await self._resolve_dependants(by_dependant, finished, known or {})

    async def _resolve_dependants(self, by_dependant: dict[str, list[str]], finished: dict[str, Status], known: dict[str, TaskState]) -> None:
        """Resolve the edges ``by_dependant`` (dependant -> its finished dependencies), at most
        :data:`MAX_FILTERS` dependants at a time: a record holds its task's body, so a hub
        with thousands of dependants is not read into memory at once."""
        items = list(by_dependant.items())
        for start in range(0, len(items), MAX_FILTERS):
            await self._resolve_chunk(dict(items[start : start + MAX_FILTERS]), finished, dict(known))

    async def _resolve_chunk(self, by_dependant: dict[str, list[str]], finished: dict[str, Status], known: dict[str, TaskState]) -> None:
        entries: dict[str, tuple[WaitingRecord, int] | None] = {dependant: self.recent.take(dependant) for dependant in by_dependant}
        if unknown := [dependant for dependant, entry in entries.items() if entry is None]:
            entries.update(await self._records(unknown))
        after_conflict = False
        for _ in range(CAS_ROUNDS):
            writes: list[tuple[WaitingRecord, int]] = []
            ended: list[tuple[WaitingRecord, int]] = []
            for dependant in by_dependant:
                entry = entries.get(dependant)
                if entry is None:  # not registered (an edge outlived its record), or expired
                    continue
                record = entry[0]
                if record.state != WAITING:
                    if not record.acted and not after_conflict:  # else the writer that just won acts
                        ended.append(entry)
                    continue
                if _decide(record, finished):
                    writes.append(entry)
                else:
                    self.recent.keep(*entry)
            releasing = [r for r, _ in (*writes, *ended) if r.state == RELEASED]
            wanted = [d for d in dict.fromkeys(d for r in releasing for d in r.depends_on) if d not in known]
            results = asyncio.ensure_future(self._states(wanted)) if wanted else None
            try:
                sequences = await self._publish(
                    [(_kv_subject(subjects.WAITING_BUCKET, r.task.id), msgspec.json.encode(r), COMPARE_AND_SET % rev) for r, rev in writes]
                )
            finally:
                if results is not None:
                    known.update(await results)
            lost: list[str] = []
            progress: list[ev.Event] = []
            for (record, _), sequence in zip(writes, sequences, strict=True):
                if sequence is None:
                    lost.append(record.task.id)
                    continue
                if record.split and record.state != CANCELLED:
                    progress.append(_split_progress(record))
                if record.state != WAITING:
                    ended.append((record, sequence))
                else:
                    self.recent.keep(record, sequence)
            if progress:
                await self.recorder.record(progress)
            await self._act_all(ended, known)
            if not lost:
                return
            by_dependant = {dependant: by_dependant[dependant] for dependant in lost}
            entries = dict(await self._records(lost))
            after_conflict = True
        raise RuntimeError(f"waiting records of {len(by_dependant)} task(s) kept changing; resolving them again later")

    async def _edges(self, dependencies: Iterable[str]) -> list[tuple[str, str]]:
        """``(dependency, dependant)`` of every edge from ``dependencies``."""
        prefix = f"$KV.{subjects.DEPENDANTS_BUCKET}."
        filters = [f"{prefix}{dependency}.*" for dependency in dependencies]
        stream = f"KV_{subjects.DEPENDANTS_BUCKET}"
        found = await asyncio.gather(*(self._matching(stream, filters[start : start + MAX_FILTERS]) for start in range(0, len(filters), MAX_FILTERS)))
        edges: list[tuple[str, str]] = []
        for subject in (subject for chunk in found for subject in chunk):
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
        stream = f"KV_{subjects.WAITING_BUCKET}"
        chunks = [[prefix + task_id for task_id in task_ids[start : start + MAX_FILTERS]] for start in range(0, len(task_ids), MAX_FILTERS)]
        records: dict[str, tuple[WaitingRecord, int]] = {}
        for found in await asyncio.gather(*(last_values(self.bus, stream, chunk) for chunk in chunks)):
            if found is None:  # no answer from the bucket (a restart, an election): not "no records"
                raise RuntimeError(f"stream {stream} answered no direct get; resolving again later")
            for subject, revision, data in found:
                records[subject[len(prefix) :]] = (_record_decoder.decode(data), revision)
        return records

    async def _transition(self, task_id: str, decide: Callable[[WaitingRecord], bool]) -> bool:
        """Change one waiting record with ``decide`` (True when it changed it) by compare-and-set,
        re-reading on a conflict, and carry it out once it stops waiting; True when this call
        ended the wait. (A timeout or a cancel: one task at a time.)"""
        self.recent.take(task_id)  # read afresh: a cancel or a timeout comes seldom, and may come from elsewhere
        for _ in range(CAS_ROUNDS):
            entry = (await self._records([task_id])).get(task_id)
            if entry is None:
                return False
            record, revision = entry
            if record.state != WAITING:
                if not record.acted:  # its resolver crashed before carrying it out
                    await self._act_all([entry], {})
                return False
            if not decide(record):
                return False
            write = (_kv_subject(subjects.WAITING_BUCKET, task_id), msgspec.json.encode(record), COMPARE_AND_SET % revision)
            (sequence,) = await self._publish([write])
            if sequence is None:
                continue
            self.recent.keep(record, sequence)
            if record.state != WAITING:
                await self._act_all([(record, sequence)], {})
                return True
            return False
        raise RuntimeError(f"waiting record of {task_id} kept changing; trying again later")

    async def _act_all(self, ended: list[tuple[WaitingRecord, int]], known: dict[str, TaskState]) -> None:
        """Carry out ended waits: place the released tasks with their dependencies' results (or
        fail one they make too big), record the cancellations, then mark the records acted on
        and drop their timeout schedules. ``known`` holds states already at hand, so only
        the other dependencies' results are read."""
        if not ended:
            return
        now = time.time()
        released = [record for record, _ in ended if record.state == RELEASED]
        wanted = [d for d in dict.fromkeys(d for record in released for d in record.depends_on) if d not in known]
        states = {**known, **(await self._states(wanted))} if wanted else known
        events: list[ev.Event] = []
        placements: list[ReadyTask] = []
        for record, _ in ended:
            task = record.task
            if record.state == CANCELLED:
                if record.split:
                    events.append(ev.Failed(task_id=task.id, at=now, region=task.region, trace=task.trace, error=record.reason))
                else:
                    events.append(ev.Cancelled(task_id=task.id, at=now, region=task.region, trace=task.trace, reason=record.reason))
                continue
            results: dict[str, msgspec.Raw | None] = {}
            for dependency in record.depends_on:
                result = states[dependency].result if dependency in states else msgspec.UNSET
                results[dependency] = None if isinstance(result, msgspec.UnsetType) else result
            if record.collect:  # a split without a gather type: its result is the chunks' results
                listed = b"[" + b",".join(b"null" if r is None else bytes(r) for r in results.values()) + b"]"
                events.append(ev.Succeeded(task_id=task.id, at=now, region=task.region, trace=task.trace, result=msgspec.Raw(listed)))
                continue
            body = with_results(task.body, results)
            if len(body) > self.settings.max_payload_bytes:
                error = f"the results of its dependencies make its body {len(body)} bytes, over max_payload_bytes ({self.settings.max_payload_bytes})"
                events.append(ev.Failed(task_id=task.id, at=now, region=task.region, trace=task.trace, error=error))
                continue
            placements.append(msgspec.structs.replace(task, body=body))
            if task.is_delayed(now):
                events.append(ev.Waiting(task_id=task.id, at=now, region=task.region, trace=task.trace, until=task.run_at))
            else:
                events.append(ev.Scheduled(task_id=task.id, at=now, region=task.region, trace=task.trace, priority=task.priority))
        await place(self.bus, placements, now=now)
        await self.recorder.record(events)
        marks: list[Publication] = []
        for record, revision in ended:
            record.acted = True
            marks.append((_kv_subject(subjects.WAITING_BUCKET, record.task.id), msgspec.json.encode(record), COMPARE_AND_SET % revision))
            # The timeout schedule goes too: rolled up by an empty message that expires at once.
            marks.append((subjects.dependency_timer(record.task.id), b"", _UNSCHEDULE))
        await self._publish(marks)  # a mark that lost to another resolver's is fine: it acted too

    # -- cancellation (a master's canceller) ------------------------------------------------------

    async def cancel(self, task_id: str, reason: str) -> bool:
        """Cancel ``task_id`` if it waits for dependencies; True when it was waiting.

        The record is marked (``cancelled``, then acted on: the ``cancelled`` event, whose
        dependants cascade), never deleted, so a redelivered submission does not register
        the task again and a resolver racing this one loses its compare-and-set."""

        def decide(record: WaitingRecord) -> bool:
            record.state = CANCELLED
            record.reason = reason
            record.split = False  # a split's gather task cancelled on request ends cancelled, not failed
            return True

        return await self._transition(task_id, decide)

    # -- priority ------------------------------------------------------------------------------

    async def set_priority(self, task_id: str, priority: str, generation: int) -> bool:
        """Give a task waiting for its dependencies the new ``priority`` it is released at (by
        compare-and-set on its record); True when it was waiting."""
        waits = False

        def decide(record: WaitingRecord) -> bool:
            nonlocal waits
            waits = True
            if record.task.priority == priority and record.task.generation >= generation:
                return False
            record.task = msgspec.structs.replace(record.task, priority=priority, generation=generation)
            return True

        await self._transition(task_id, decide)
        return waits

    # -- timeouts ------------------------------------------------------------------------------

    async def time_out(self, task_id: str) -> None:
        """The dependency timeout of ``task_id`` fired: cancel it if it still waits (a late fire does nothing)."""

        def decide(record: WaitingRecord) -> bool:
            if not record.unmet:
                return False
            record.state = CANCELLED
            record.reason = f"dependency {', '.join(record.unmet)} not finished within {record.timeout_s:g} s"
            return True

        await self._transition(task_id, decide)
