"""The region registry: which regional schedulers are alive, and how much room their regions have (KV ``regions``).

Each regional scheduler runs a :class:`RegionPresence`, which puts a :class:`RegionInfo` under
``<region>.<scheduler key>`` when it starts and again every ``worker_heartbeat_s`` (the
workers' heartbeat: one setting for every registry), from a timer loop of its own, and
deletes it on a clean stop. The bucket's TTL is three heartbeats, as KV ``workers``', so the
entry of a scheduler that vanished expires by itself, and readers count an entry as gone
once its last heartbeat is older than that.

What an entry reports of its region, measured at each heartbeat:

* ``backlog``: tasks in WORK that no worker has taken yet, the ``num_pending`` of the
  region's WORK durables, from one ``$JS.API.CONSUMER.LIST.WORK`` request (a durable's
  filter subject ``work.<region>.<priority>.<type>`` names its region). A task of a type
  that no worker has loaded has no durable yet and is not counted.
* ``ack_pending``: tasks delivered to the region's workers and not acked yet.
* ``workers``, ``capacity``, ``running``, ``waiting``: the live workers of the region in
  state ``running`` (from a :class:`~streamsched.roles.worker_registry.LiveWorkers`), their
  handler slots, the tasks in their handlers and those they hold waiting for a slot.

:class:`LiveRegions` mirrors the bucket in memory for the master's router
(:mod:`streamsched.roles.routing`); :func:`live_regions` reads it once, for
``streamsched regions list``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Iterable

import anyio
import msgspec
import nats.errors
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from .. import subjects
from ..config import Settings
from ..transport.answering import when_answered
from ..transport.bus import Bus
from ..transport.kv_watch import BucketWatch, bucket_values
from ..transport.pull import consumer_loads
from .worker_registry import DEREGISTER_TIMEOUT_S, HEARTBEATS_TO_LIVE, LOAD_TIMEOUT_S, VERSION, LiveWorkers

log = logging.getLogger("streamsched.regions")

#: Regional schedulers a :class:`LiveRegions` keeps at most; past it, the one heard from least recently goes.
MAX_WATCHED = 1_000
#: Numbers the regional schedulers of one process (tests, a user's own program) apart in their ids.
_SCHEDULERS_MADE = itertools.count(1)


class RegionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A regional scheduler's entry in KV ``regions`` (its value, as JSON): itself, and its region's load."""

    id: str
    """``<host>-<pid>`` (and a number for a second scheduler of one process)."""
    region: str
    host: str
    pid: int
    version: str
    started_at: float
    heartbeat_at: float
    """When this entry was put (the scheduler's clock, Unix seconds)."""
    heartbeat_s: float
    """Its ``worker_heartbeat_s``: the entry is stale :data:`HEARTBEATS_TO_LIVE` of them after ``heartbeat_at``."""
    backlog: int = 0
    """Tasks in the region's WORK durables that no worker has taken yet."""
    ack_pending: int = 0
    """Tasks delivered to the region's workers, not acked yet."""
    workers: int = 0
    """Live workers of the region in state ``running``."""
    capacity: int = 0
    """Their handler slots (the sum of their ``concurrency``)."""
    running: int = 0
    """Tasks in their handlers."""
    waiting: int = 0
    """Tasks they hold waiting for a slot."""

    @property
    def key(self) -> str:
        return subjects.region_key(self.region, self.id)

    @property
    def expires_at(self) -> float:
        return self.heartbeat_at + HEARTBEATS_TO_LIVE * self.heartbeat_s

    def is_live(self, now: float) -> bool:
        """Heard from within :data:`HEARTBEATS_TO_LIVE` of its heartbeats before ``now``."""
        return now < self.expires_at


_decoder = msgspec.json.Decoder(RegionInfo)


def _decode(data: bytes) -> RegionInfo | None:
    """The entry, or None for a value no scheduler of this version wrote."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None


def _live(infos: Iterable[RegionInfo], now: float) -> list[RegionInfo]:
    return sorted((info for info in infos if info.is_live(now)), key=lambda info: (info.region, info.id))


async def work_load(bus: Bus, region: str) -> tuple[int, int]:
    """``(backlog, ack_pending)`` of ``region`` in WORK, from one listing of its consumers."""
    backlog = ack_pending = 0
    for consumer in await consumer_loads(bus, subjects.WORK_STREAM):
        parsed = subjects.parse_work(consumer.filter_subject)
        if parsed is not None and parsed[0] == region:
            backlog += consumer.num_pending
            ack_pending += consumer.num_ack_pending
    return backlog, ack_pending


class RegionPresence:
    """A regional scheduler's entry in KV ``regions``, while :meth:`run` runs."""

    def __init__(self, bus: Bus, settings: Settings, region: str, workers: LiveWorkers) -> None:
        """``workers``: the scheduler's live view of the workers (started and stopped by it)."""
        self.bus = bus
        self.region = region
        self.heartbeat_s = settings.worker_heartbeat_s
        number = next(_SCHEDULERS_MADE)
        self.host = socket.gethostname()
        self.id = f"{self.host}-{os.getpid()}" + (f"-{number}" if number > 1 else "")
        self.key = subjects.region_key(region, self.id)
        self.workers = workers
        self.started_at = time.time()
        self._load = (0, 0)  # the last (backlog, ack_pending) measured, kept when a listing fails
        self._failing = False  # the last heartbeat failed (said once, not every heartbeat)
        self._stopped = asyncio.Event()

    async def info(self) -> RegionInfo:
        """The entry as of now: the region's WORK listed once, its workers from the live view."""
        with contextlib.suppress(nats.errors.Error):  # slow or disconnected: the last figures stand
            self._load = await work_load(self.bus, self.region)
        backlog, ack_pending = self._load
        mine = [info for info in self.workers.workers() if info.region == self.region and info.state == "running"]
        return RegionInfo(
            id=self.id,
            region=self.region,
            host=self.host,
            pid=os.getpid(),
            version=VERSION,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            heartbeat_s=self.heartbeat_s,
            backlog=backlog,
            ack_pending=ack_pending,
            workers=len(mine),
            capacity=sum(info.concurrency for info in mine),
            running=sum(info.running for info in mine),
            waiting=sum(info.waiting for info in mine),
        )

    async def run(self) -> None:
        """Register and put the entry every heartbeat until :meth:`shutdown`; then deregister.

        Without the bucket (streams not applied since an upgrade) it says so and returns: the
        scheduler goes on releasing tasks, and the masters, knowing of no scheduler, route by hash."""
        try:
            kv = await when_answered(lambda: self.bus.js.key_value(subjects.REGIONS_BUCKET), "for KV regions")
        except NotFoundError:
            log.error("no KV bucket %s: run `streamsched streams apply`; this scheduler is not registered meanwhile", subjects.REGIONS_BUCKET)
            return
        self.started_at = time.time()
        try:
            while not self._stopped.is_set():
                await self._put(kv)
                with anyio.move_on_after(self.heartbeat_s):
                    await self._stopped.wait()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(DEREGISTER_TIMEOUT_S):
                try:
                    await kv.delete(self.key)
                except nats.errors.Error as exc:
                    log.warning("regional scheduler entry not deleted (%r); it expires within %d heartbeats", exc, HEARTBEATS_TO_LIVE)
                else:
                    log.info("regional scheduler %s of region %s deregistered", self.id, self.region)

    def shutdown(self) -> None:
        self._stopped.set()

    async def _put(self, kv: KeyValue) -> None:
        try:
            await kv.put(self.key, msgspec.json.encode(await self.info()))
        except nats.errors.Error as exc:  # disconnected, or the server is busy: the next heartbeat tries again
            if not self._failing:
                log.warning("regional scheduler entry not put in KV %s (%r); trying every heartbeat", subjects.REGIONS_BUCKET, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("regional scheduler entry put in KV %s again", subjects.REGIONS_BUCKET)
            self._failing = False


async def live_regions(bus: Bus, *, now: float | None = None) -> list[RegionInfo]:
    """Every regional scheduler whose entry is in KV ``regions`` and not stale, by region and id."""
    values = await bucket_values(bus, subjects.REGIONS_BUCKET)
    entries = [info for info in map(_decode, values.values()) if info is not None]
    return _live(entries, time.time() if now is None else now)


class LiveRegions:
    """The regional schedulers in KV ``regions``, mirrored in memory by a :class:`BucketWatch`."""

    def __init__(self, bus: Bus, *, limit: int = MAX_WATCHED) -> None:
        self.limit = limit
        self.entries: dict[str, RegionInfo] = {}
        """Every entry heard of (stale ones included), by key; the least recently heard first."""
        self._watch = BucketWatch(bus, subjects.REGIONS_BUCKET, self._on_change)

    async def start(self) -> None:
        """Subscribe and wait (up to :data:`LOAD_TIMEOUT_S`) until the schedulers registered now are in."""
        if not await self._watch.start(LOAD_TIMEOUT_S):
            log.warning("regional schedulers not all loaded after %.0fs; going on, the rest follow", LOAD_TIMEOUT_S)

    async def stop(self) -> None:
        await self._watch.stop()

    def schedulers(self, now: float | None = None) -> list[RegionInfo]:
        """The live regional schedulers, by region and id."""
        return _live(self.entries.values(), time.time() if now is None else now)

    def _on_change(self, key: str, value: bytes | None) -> None:
        self.entries.pop(key, None)  # popped so that an update moves it last
        info = None if value is None else _decode(value)
        if info is not None:
            self.entries[key] = info
            if len(self.entries) > self.limit:
                del self.entries[next(iter(self.entries))]
