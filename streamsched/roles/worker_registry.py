"""The worker registry: which workers are alive, where, with which handlers, how busy (KV ``workers``).

A worker's :class:`Presence` puts its :class:`WorkerInfo` under its key when the worker
starts and again every ``worker_heartbeat_s``, from a timer loop of its own (nothing on the
per-task path), and deletes it on a clean stop. The bucket's TTL is
:data:`HEARTBEATS_TO_LIVE` heartbeats, so the entry of a worker that vanished (SIGKILL, a
lost host) expires by itself; readers count an entry whose last heartbeat is older than
that as gone already, whenever the server gets round to expiring it.

Drain (``streamsched workers drain``): a core NATS request on the worker's own subject
(:func:`~streamsched.subjects.worker_drain`), answered at once with its entry in state
``draining``. The worker then does what it does on SIGTERM: it stops fetching, lets the
tasks it holds finish within ``grace_s`` (naks the rest), deletes its entry, and its
process exits 0. A request nobody answers names no live worker.

:class:`LiveWorkers` mirrors the bucket in memory, for a role that asks "does a worker of
region R handle task type X?".
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any, Literal, Protocol

import anyio
import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from .. import subjects
from ..config import Settings
from ..errors import NotFound
from ..registry import Registry
from ..transport.answering import when_answered
from ..transport.bus import Bus
from ..transport.kv_watch import BucketWatch, bucket_values

log = logging.getLogger("streamsched.workers")

#: An entry lives this many of its worker's heartbeats after its last put (the bucket's TTL).
HEARTBEATS_TO_LIVE = 3
#: Workers a :class:`LiveWorkers` keeps at most; past it, the one heard from least recently goes.
MAX_WATCHED = 10_000
#: Seconds :meth:`LiveWorkers.start` waits for the entries already in the bucket.
LOAD_TIMEOUT_S = 5.0
#: Seconds a drain request waits for the worker's answer (it answers from its event loop at once).
DRAIN_ANSWER_TIMEOUT_S = 2.0
#: Longest a stopping worker spends deleting its entry (it expires anyway).
DEREGISTER_TIMEOUT_S = 5.0
#: How often :func:`wait_gone` looks at the entry.
GONE_POLL_S = 0.1

WorkerState = Literal["running", "draining"]


def worker_id(pid: int, number: int = 1) -> str:
    """The id of the ``number``-th worker made by process ``pid`` of this host: ``<host>-<pid>``,
    and ``-<number>`` after it from the second on."""
    return f"{socket.gethostname()}-{pid}" + (f"-{number}" if number > 1 else "")


def _package_version() -> str:
    try:
        return importlib.metadata.version("streamsched")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


#: The version every entry of this process reports.
VERSION = _package_version()


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's entry in KV ``workers`` (its value, as JSON)."""

    id: str
    """``<host>-<pid>``, as in the events it records."""
    host: str
    pid: int
    region: str
    types: tuple[str, ...]
    """The task types it has handlers for, sorted."""
    concurrency: int
    """Handler slots."""
    prefetch: int
    """Tasks it may hold waiting for a slot."""
    version: str
    """The streamsched package version it runs."""
    started_at: float
    heartbeat_at: float
    """When this entry was put (the worker's clock, Unix seconds)."""
    heartbeat_s: float
    """Its ``worker_heartbeat_s``: the entry is stale :data:`HEARTBEATS_TO_LIVE` of them after ``heartbeat_at``."""
    state: WorkerState = "running"
    """``draining`` once it stopped fetching (a drain request or a signal): it takes no new task."""
    running: int = 0
    """Tasks in its handlers now."""
    waiting: int = 0
    """Tasks it holds waiting for a free slot."""
    finished: dict[str, int] = msgspec.field(default_factory=dict)
    """Tasks it finished since it started, by outcome (succeeded, retrying, failed, dead, cancelled)."""
    outcomes: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    """Attempts it finished since it started, by task type, then outcome (succeeded, retrying,
    failed, dead): what the masters' circuit breakers count (:mod:`streamsched.roles.breakers`)."""

    @property
    def key(self) -> str:
        return subjects.worker_key(self.id)

    @property
    def expires_at(self) -> float:
        return self.heartbeat_at + HEARTBEATS_TO_LIVE * self.heartbeat_s

    def is_live(self, now: float) -> bool:
        """Heard from within :data:`HEARTBEATS_TO_LIVE` of its heartbeats before ``now``."""
        return now < self.expires_at


_decoder = msgspec.json.Decoder(WorkerInfo)


def _decode(data: bytes) -> WorkerInfo | None:
    """The entry, or None for a value no worker of this version wrote."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None


class Registrant(Protocol):
    """What a :class:`Presence` reads from its worker (:class:`~streamsched.roles.worker.Worker`)."""

    id: str
    region: str
    concurrency: int
    prefetch: int
    registry: Registry
    counts: dict[str, int]
    outcomes: dict[str, dict[str, int]]

    def load(self) -> tuple[int, int]:
        """Tasks in handlers now, and tasks waiting for a slot."""
        ...

    async def shutdown(self) -> None: ...


class Presence:
    """A worker's entry in KV ``workers`` and its drain subject, while :meth:`run` runs."""

    def __init__(self, bus: Bus, settings: Settings, worker: Registrant) -> None:
        self.bus = bus
        self.worker = worker
        self.heartbeat_s = settings.worker_heartbeat_s
        self.key = subjects.worker_key(worker.id)
        self.host = socket.gethostname()
        self.state: WorkerState = "running"
        self.started_at = time.time()
        self._kv: KeyValue | None = None  # set while registered
        self.registered = anyio.Event()  # the first entry is in KV
        self._failing = False  # the last put failed (said once, not every heartbeat)

    def info(self) -> WorkerInfo:
        """The worker's entry as of now."""
        worker = self.worker
        running, waiting = worker.load()
        return WorkerInfo(
            id=worker.id,
            host=self.host,
            pid=os.getpid(),
            region=worker.region,
            types=tuple(worker.registry.names()),
            concurrency=worker.concurrency,
            prefetch=worker.prefetch,
            version=VERSION,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            heartbeat_s=self.heartbeat_s,
            state=self.state,
            running=running,
            waiting=waiting,
            finished=dict(worker.counts),
            outcomes={task_type: dict(counts) for task_type, counts in worker.outcomes.items()},
        )

    async def run(self) -> None:
        """Register, answer drain requests and put the entry every heartbeat until cancelled
        (the worker's task group ends once it drained); then deregister."""
        try:
            kv = await when_answered(lambda: self.bus.js.key_value(subjects.WORKERS_BUCKET), "for KV workers")
        except NotFoundError:
            log.error("no KV bucket %s: run `streamsched streams apply` (this version needs it)", subjects.WORKERS_BUCKET)
            raise
        await self._check_ttl(kv)
        self.started_at = time.time()
        sub = await self.bus.nc.subscribe(subjects.worker_drain(self.worker.id), cb=self._on_drain)
        self._kv = kv
        try:
            while True:
                await self._put()
                self.registered.set()
                await anyio.sleep(self.heartbeat_s)
        finally:
            self._kv = None  # no put after the delete
            with anyio.CancelScope(shield=True), anyio.move_on_after(DEREGISTER_TIMEOUT_S):
                with contextlib.suppress(nats.errors.Error):  # the connection is gone: nothing more arrives
                    await sub.unsubscribe()
                try:
                    await kv.delete(self.key)
                except nats.errors.Error as exc:
                    log.warning("worker entry not deleted (%r); it expires within %d heartbeats", exc, HEARTBEATS_TO_LIVE)
                else:
                    log.info("worker %s deregistered", self.worker.id)

    async def draining(self) -> None:
        """The worker stopped fetching: its entry says so at once."""
        self.state = "draining"
        await self._put()

    async def _on_drain(self, msg: Any) -> None:
        log.info("drain requested: fetching nothing more, finishing the tasks held here (up to grace_s), then exiting")
        self.state = "draining"
        with contextlib.suppress(nats.errors.Error):  # a request without a reply subject, or a lost connection
            await msg.respond(msgspec.json.encode(self.info()))
        await self.worker.shutdown()

    async def _put(self) -> None:
        if self._kv is None:
            return
        try:
            await self._kv.put(self.key, msgspec.json.encode(self.info()))
        except nats.errors.Error as exc:  # disconnected, or the server is busy: the next heartbeat tries again
            if not self._failing:
                log.warning("worker entry not put in KV %s (%r); trying every heartbeat", subjects.WORKERS_BUCKET, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("worker entry put in KV %s again", subjects.WORKERS_BUCKET)
            self._failing = False

    async def _check_ttl(self, kv: KeyValue) -> None:
        """Warn when the bucket would expire this worker's entry between two heartbeats: it
        was made for a longer ``worker_heartbeat_s`` than this worker's."""
        ttl = (await kv.status()).ttl
        if ttl and ttl < HEARTBEATS_TO_LIVE * self.heartbeat_s - 0.01:
            log.warning(
                "KV %s expires an entry %.1f s after its last put, under %d heartbeats of this worker (%.1f s apart): "
                "it may drop out of `workers list`; run `streamsched streams apply` with this worker_heartbeat_s",
                subjects.WORKERS_BUCKET,
                ttl,
                HEARTBEATS_TO_LIVE,
                self.heartbeat_s,
            )


async def live_workers(bus: Bus, *, now: float | None = None) -> list[WorkerInfo]:
    """Every worker whose entry is in KV ``workers`` and not stale, by region and id."""
    values = await bucket_values(bus, subjects.WORKERS_BUCKET)
    entries = [info for info in map(_decode, values.values()) if info is not None]
    return _live(entries, time.time() if now is None else now)


def _live(infos: Iterable[WorkerInfo], now: float) -> list[WorkerInfo]:
    return sorted((info for info in infos if info.is_live(now)), key=lambda info: (info.region, info.id))


async def request_drain(bus: Bus, worker_id: str, *, timeout_s: float = DRAIN_ANSWER_TIMEOUT_S) -> WorkerInfo:
    """Ask a worker to drain; its entry as it answered (state ``draining``).

    Raises :class:`~streamsched.errors.NotFound` when no worker answers to ``worker_id``
    (or its key), :class:`TimeoutError` when one is subscribed but does not answer in time.
    """
    try:
        reply = await bus.nc.request(subjects.worker_drain(worker_id), b"", timeout=timeout_s)
    except nats.errors.NoRespondersError:
        raise NotFound(f"no live worker {worker_id} (see `streamsched workers list`)") from None
    return _decoder.decode(reply.data)


async def wait_gone(bus: Bus, worker_id: str, *, timeout_s: float) -> bool:
    """Wait until the worker's entry is deleted, expired or stale; False if it is still
    there after ``timeout_s``."""
    kv = await bus.js.key_value(subjects.WORKERS_BUCKET)
    with anyio.move_on_after(timeout_s):
        while True:
            try:
                entry = await kv.get(subjects.worker_key(worker_id))
            except KeyNotFoundError:  # deleted (KeyDeletedError is one), or never there
                return True
            info = _decode(entry.value or b"")
            if info is None or not info.is_live(time.time()):
                return True
            await anyio.sleep(GONE_POLL_S)
    return False


class LiveWorkers:
    """The workers in KV ``workers``, mirrored in memory by a :class:`BucketWatch`.

    Only live workers in state ``running`` count for :meth:`handles` and :meth:`types_in`:
    a draining one takes no new task, and a stale one (no heartbeat for
    :data:`HEARTBEATS_TO_LIVE` of its own) is taken as gone before the server expires it.
    The answer per region is computed again only when a worker comes, goes, changes its
    region, types or state, or one goes stale: a heartbeat that only updates counts costs
    a dict write, a question a dict lookup and a clock read.
    """

    def __init__(self, bus: Bus, *, limit: int = MAX_WATCHED) -> None:
        self.limit = limit
        self.entries: dict[str, WorkerInfo] = {}
        """Every entry heard of (stale ones included), by key; the least recently heard first."""
        self._watch = BucketWatch(bus, subjects.WORKERS_BUCKET, self._on_change)
        self._types: dict[str, frozenset[str]] = {}
        self._valid_until = 0.0  # when the first worker counted in _types goes stale
        self._outdated = True

    async def start(self) -> None:
        """Subscribe and wait (up to :data:`LOAD_TIMEOUT_S`) until the workers registered now are in."""
        if not await self._watch.start(LOAD_TIMEOUT_S):
            log.warning("workers not all loaded after %.0fs; going on, the rest follow", LOAD_TIMEOUT_S)

    async def stop(self) -> None:
        await self._watch.stop()

    def handles(self, region: str, task_type: str) -> bool:
        """True when a live, running worker of ``region`` has a handler for ``task_type``."""
        return task_type in self._by_region().get(region, frozenset())

    def handled(self, region: str) -> frozenset[str]:
        """The task types the live, running workers of ``region`` handle, as held (not copied):
        for a caller that asks about many tasks at once."""
        return self._by_region().get(region, frozenset())

    def types_in(self, region: str) -> set[str]:
        """The task types the live, running workers of ``region`` handle."""
        return set(self._by_region().get(region, frozenset()))

    def workers(self) -> list[WorkerInfo]:
        """The live workers (running or draining), by region and id."""
        return _live(self.entries.values(), time.time())

    def _on_change(self, key: str, value: bytes | None) -> None:
        before = self.entries.pop(key, None)  # popped so that an update moves it last
        info = None if value is None else _decode(value)
        if info is not None:
            self.entries[key] = info
            if len(self.entries) > self.limit:
                del self.entries[next(iter(self.entries))]
                self._outdated = True
        if (
            info is None
            or before is None
            or not before.is_live(time.time())  # back after a silence: counted again
            or (before.region, before.types, before.state) != (info.region, info.types, info.state)
        ):
            self._outdated = True

    def _by_region(self) -> dict[str, frozenset[str]]:
        now = time.time()
        if self._outdated or now >= self._valid_until:
            types: dict[str, set[str]] = {}
            valid_until = float("inf")
            for info in self.entries.values():
                if info.state == "running" and info.is_live(now):
                    types.setdefault(info.region, set()).update(info.types)
                    valid_until = min(valid_until, info.expires_at)
            self._types = {region: frozenset(found) for region, found in types.items()}
            self._valid_until = valid_until
            self._outdated = False
        return self._types
