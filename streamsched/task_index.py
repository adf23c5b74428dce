"""The task list the APIs answer from: an in-memory index of KV ``tasks``, kept by the API
process from a watch of the bucket.

Why a view in the API process: a list request must not read the bucket (100,000 states
is seconds of reads), and an index kept in KV or a stream would cost every task another
write on the path all tasks take. The API process already holds a connection; it follows
the bucket as the projector writes it (an ordered consumer from the first key: the states
held, then every change) and keeps, per task, only what the filters and the sort need (a
few fields decoded from each state, the rest skipped), in sorted lists by submission time:
one of every task and one per status. A page is then a walk from the cursor: ``O(log n)``
to find it plus the entries looked at, however many tasks there are.

Bounded: past ``max_tasks`` entries the oldest submissions are dropped from the view
(they stay in KV ``tasks``, readable by id). A restart rebuilds the view from the bucket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping

import msgspec
from sortedcontainers import SortedList  # type: ignore[import-untyped]  # no stubs are published for it

from . import subjects
from .errors import Rejected, Unavailable
from .model import Status
from .transport.bus import Bus
from .transport.kv_watch import BucketWatch

log = logging.getLogger("streamsched.api")

#: Entries a page holds at most.
MAX_PAGE = 1000
#: How long a list request waits for the view to load at start before it is answered "not ready".
LOAD_WAIT_S = 5.0


class Indexed(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the view keeps of a task's state (the fields it filters and sorts by)."""

    id: str
    status: Status
    type: str | None = None
    priority: str | None = None
    region: str | None = None
    labels: dict[str, str] = {}
    submitted_at: float | None = None
    updated_at: float | None = None

    @property
    def key(self) -> tuple[float, str]:
        """Its place in the lists: submission time (its last update before that is known), then id."""
        return (self.submitted_at or self.updated_at or 0.0, self.id)


_decoder = msgspec.json.Decoder(Indexed)


class Page(msgspec.Struct, frozen=True):
    """One page of a list: tasks newest first, and the cursor of the next page (None: the last)."""

    tasks: list[Indexed]
    next_cursor: str | None


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    status: Status | None = None
    type: str | None = None
    region: str | None = None
    labels: Mapping[str, str] = {}
    since: float | None = None
    until: float | None = None

    def admits(self, entry: Indexed) -> bool:
        if self.type is not None and entry.type != self.type:
            return False
        if self.region is not None and entry.region != self.region:
            return False
        return all(entry.labels.get(name) == value for name, value in self.labels.items())


def encode_cursor(entry: Indexed) -> str:
    at, task_id = entry.key
    return f"{at!r}~{task_id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    """``ValueError`` for a cursor this view did not make."""
    at, sep, task_id = cursor.partition("~")
    if not sep or not task_id:
        raise ValueError(f"not a cursor: {cursor!r}")
    return float(at), task_id


class TaskIndex:
    """The view (see the module): :meth:`start`, then :meth:`page` and :meth:`counts`."""

    def __init__(self, bus: Bus, *, max_tasks: int = 1_000_000) -> None:
        self.max_tasks = max_tasks
        self.entries: dict[str, Indexed] = {}
        self._all = SortedList()
        self._by_status: dict[Status, SortedList] = {status: SortedList() for status in Status}
        self._watch = BucketWatch(bus, subjects.STATE_BUCKET, self._on_change)
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        """Follow the bucket; returns at once (:attr:`loaded` is set when the states held now are in)."""
        asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            await self._watch.start(timeout_s=3600.0)
        except Exception as exc:  # noqa: BLE001 - the API answers the rest; lists say why they cannot
            log.error("the task list cannot follow KV %s (%r)", subjects.STATE_BUCKET, exc)
            return
        self.loaded.set()
        log.info("task list loaded: %d tasks", len(self.entries))

    async def stop(self) -> None:
        await self._watch.stop()

    def _on_change(self, task_id: str, value: bytes | None) -> None:
        old = self.entries.pop(task_id, None)
        if old is not None:
            self._all.discard(old.key)
            self._by_status[old.status].discard(old.key)
        if value is None:
            return
        try:
            entry = _decoder.decode(value)
        except msgspec.DecodeError:
            return
        self.entries[task_id] = entry
        self._all.add(entry.key)
        self._by_status[entry.status].add(entry.key)
        if len(self.entries) > self.max_tasks:
            _, oldest = self._all[0]
            self._on_change(oldest, None)

    def counts(self) -> dict[str, int]:
        """Tasks in the view by status."""
        return {status.value: len(keys) for status, keys in self._by_status.items()}

    async def loaded_page(self, where: Filter, *, limit: int = 50, cursor: str | None = None) -> Page:
        """:meth:`page` once the view is loaded (waiting up to :data:`LOAD_WAIT_S`), with the
        errors the APIs answer: :class:`Unavailable` while it loads, :class:`Rejected` naming
        ``cursor`` for a cursor it did not make."""
        try:
            async with asyncio.timeout(LOAD_WAIT_S):
                await self.loaded.wait()
        except TimeoutError:
            raise Unavailable("the task list is still loading; try again shortly") from None
        try:
            return self.page(where, limit=limit, cursor=cursor)
        except ValueError as exc:
            raise Rejected(str(exc), field="cursor") from None

    def page(self, where: Filter, *, limit: int = 50, cursor: str | None = None) -> Page:
        """Up to ``limit`` tasks that ``where`` admits, newest submission first, after ``cursor``
        (the previous page's ``next_cursor``); ``ValueError`` for a cursor it did not make."""
        limit = max(1, min(limit, MAX_PAGE))
        keys = self._all if where.status is None else self._by_status[where.status]
        found: list[Indexed] = []
        for key in self._walk(keys, where, cursor):
            entry = self.entries.get(key[1])
            if entry is None or not where.admits(entry):
                continue
            if len(found) == limit:
                return Page(found, encode_cursor(found[-1]))
            found.append(entry)
        return Page(found, None)

    @staticmethod
    def _walk(keys: SortedList, where: Filter, cursor: str | None) -> Iterator[tuple[float, str]]:
        """Keys newest first, from the cursor (exclusive) and within ``since``/``until``."""
        top: tuple[float, str] | None = decode_cursor(cursor) if cursor else None
        if where.until is not None and (top is None or where.until < top[0]):
            top = (where.until, "\U0010ffff")  # after every id at that time: the instant itself is in
            inclusive = True
        else:
            inclusive = False
        bottom = (where.since, "") if where.since is not None else None
        keys_in: Iterator[tuple[float, str]] = keys.irange(bottom, top, inclusive=(True, inclusive or top is None), reverse=True)
        return keys_in
