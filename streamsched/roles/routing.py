"""Health-aware routing: the region the master queues a task in.

A region is **healthy** when at least one of its regional schedulers is live in KV
``regions`` and that scheduler's latest report counts at least one live worker of the
region in state ``running`` (:mod:`streamsched.roles.region_registry`). Its **headroom**
is what its workers could still take: ``capacity - running - waiting - backlog`` (handler
slots, less the tasks in handlers, waiting in workers for a slot, and queued in WORK).

A task that names no region goes to a healthy one, by a share of the task ids:

* while some healthy region has headroom, the regions with headroom share the ids in
  proportion to it (40 free slots against 10: four fifths and one fifth);
* when every healthy region is full, each gets a share in proportion to ``capacity² /
  load`` (``load = running + waiting + backlog``): its size over the time its queue takes
  to drain, so the region that drains soonest gets the most and none is starved;
* with no healthy region, or before any regional scheduler has registered at all, the
  id's hash picks among the configured regions, as it always has: one region, or a
  deployment whose schedulers do not register, routes exactly as before.

Shares, not "all to the best": the reports are a heartbeat old, and sending everything to
the region that looked emptiest for a whole heartbeat would bury it and then the next one.

The per-task decision is a table lookup: every :data:`REFRESH_S` the router recomputes a
table of :data:`TABLE_SLOTS` region names from the in-memory mirror, and a task goes to
``table[crc32(id) % len(table)]`` (a table of one region skips the hash), which costs
what the hash over the configured regions cost. A task pinned to a region (``region``)
costs a truth test of a dict while every region is healthy, and a lookup in it otherwise.

A pinned task whose region is not healthy follows its ``region_failover`` (default: the
setting): ``wait`` queues it there all the same, with a ``stranded`` event that puts the reason
in its state; ``any`` queues it in a healthy region instead, with a ``rerouted`` event.
When no region is healthy it waits where it asked to be. Nothing is recorded while no
scheduler has registered: then nothing is known.

A redelivered submission may find the table changed, and a copy in another region is not
always caught by the dedupe (see docs/ARCHITECTURE.md, "Regions"): so the master sends it
where its first copy went, as its state in KV ``tasks`` records it (:meth:`Router.after_lookup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgspec
import nats.errors
from nats.js.errors import NotFoundError

from .. import subjects
from ..config import Settings
from ..eventlog import events as ev
from ..eventlog.state import MAX_GET_MANY, StateStore
from ..transport.bus import Bus
from .region_registry import LiveRegions, RegionInfo

log = logging.getLogger("streamsched.routing")

#: Seconds between two computations of the routing table (never per task).
REFRESH_S = 0.5
#: Entries of the routing table: a region's share of the task ids in hundredths.
TABLE_SLOTS = 100


class RegionHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One region as the router sees it: its live schedulers and its latest report."""

    region: str
    configured: bool = True
    """One of the settings' regions (``regions list`` also shows registered ones that are not)."""
    schedulers: tuple[str, ...] = ()
    """Ids of its live regional schedulers."""
    workers: int = 0
    capacity: int = 0
    running: int = 0
    waiting: int = 0
    backlog: int = 0
    ack_pending: int = 0
    reported_at: float | None = None
    """When the report these counts come from was made (its scheduler's heartbeat)."""

    @property
    def problem(self) -> str | None:
        """Why it is not healthy (``no live regional scheduler``, ``no live worker``), or None."""
        if not self.schedulers:
            return "no live regional scheduler"
        if self.workers == 0:
            return "no live worker"
        return None

    @property
    def healthy(self) -> bool:
        return self.problem is None

    @property
    def load(self) -> int:
        """Tasks its workers hold or have yet to take."""
        return self.running + self.waiting + self.backlog

    @property
    def headroom(self) -> int:
        """Tasks it could take before one has to wait for a slot (negative: that many wait)."""
        return self.capacity - self.load


def region_health(configured: Sequence[str], schedulers: Iterable[RegionInfo]) -> list[RegionHealth]:
    """Each configured region (in order), then each other registered one (sorted), from the
    live schedulers' entries: the counts of a region are those of its newest report (its
    schedulers all read the same WORK stream and worker registry)."""
    by_region: dict[str, list[RegionInfo]] = {}
    for info in schedulers:
        by_region.setdefault(info.region, []).append(info)
    out: list[RegionHealth] = []
    for region in [*configured, *sorted(set(by_region) - set(configured))]:
        infos = by_region.get(region)
        if not infos:
            out.append(RegionHealth(region=region, configured=region in configured))
            continue
        newest = max(infos, key=lambda info: info.heartbeat_at)
        out.append(
            RegionHealth(
                region=region,
                configured=region in configured,
                schedulers=tuple(sorted(info.id for info in infos)),
                workers=newest.workers,
                capacity=newest.capacity,
                running=newest.running,
                waiting=newest.waiting,
                backlog=newest.backlog,
                ack_pending=newest.ack_pending,
                reported_at=newest.heartbeat_at,
            )
        )
    return out


def shares(healthy: Iterable[RegionHealth]) -> dict[str, float]:
    """Each healthy region's weight in the routing table (see the module's docstring)."""
    regions = list(healthy)
    free = {health.region: float(health.headroom) for health in regions if health.headroom > 0}
    if free:
        return free
    return {health.region: health.capacity**2 / max(health.load, 1) for health in regions if health.capacity > 0}


def route_table(weights: Mapping[str, float], slots: int = TABLE_SLOTS) -> tuple[str, ...]:
    """``slots`` region names, each region as often as its weight's share (largest remainders
    first, ties by name); a single region alone, and nothing for no positive weight."""
    positive = {region: weight for region, weight in sorted(weights.items()) if weight > 0}
    if len(positive) <= 1:
        return tuple(positive)
    total = sum(positive.values())
    exact = {region: slots * weight / total for region, weight in positive.items()}
    counts = {region: int(share) for region, share in exact.items()}
    by_remainder = sorted(exact, key=lambda region: (-(exact[region] - counts[region]), region))
    for region in by_remainder[: slots - sum(counts.values())]:
        counts[region] += 1
    table = tuple(region for region, count in counts.items() for _ in range(count))
    return table if len(set(table)) > 1 else table[:1]


class Router:
    """The master's routing table, recomputed every :data:`REFRESH_S` from a :class:`LiveRegions`."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.bus = bus
        self.regions = settings.regions
        self.failover = settings.region_failover
        self.moves = len(self.regions) > 1
        """Routing may send a task elsewhere than its first copy went (more than one region)."""
        self.live = LiveRegions(bus)
        self.table: tuple[str, ...] = self.regions
        """Where the task ids go: ``table[crc32(id) % len(table)]``."""
        self.healthy: tuple[str, ...] = ()
        self.unhealthy: dict[str, str] = {}
        """Why each configured region that is not healthy is not; empty while no scheduler has registered."""
        self._states: StateStore | None = None
        self._lookups: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Follow KV ``regions`` and recompute the table every :data:`REFRESH_S` until :meth:`shutdown`.
        Without the bucket (streams not applied since an upgrade) it says so and returns: the id's
        hash picks the region, as when no scheduler has registered."""
        try:
            await self.live.start()
        except NotFoundError:
            log.error("no KV bucket %s: run `streamsched streams apply`; routing by task id meanwhile", subjects.REGIONS_BUCKET)
            return
        try:
            while not self._stopped.is_set():
                self.refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), REFRESH_S)
        finally:
            await self.live.stop()

    def shutdown(self) -> None:
        self._stopped.set()

    def refresh(self, now: float | None = None) -> None:
        self.update(region_health(self.regions, self.live.schedulers(now)))

    def update(self, health: Sequence[RegionHealth]) -> None:
        """Recompute the table from ``health`` (of :func:`region_health`)."""
        configured = [region for region in health if region.configured]
        healthy = [region for region in configured if region.healthy]
        informed = any(region.schedulers for region in configured)
        table = route_table(shares(healthy)) if healthy else ()
        names = tuple(region.region for region in healthy)
        if names != self.healthy and informed:
            unhealthy = ", ".join(f"{region.region} ({region.problem})" for region in configured if not region.healthy)
            log.info("healthy regions: %s; not: %s", ", ".join(names) or "none", unhealthy or "none")
        self.table = table or self.regions
        self.healthy = names
        self.unhealthy = {region.region: region.problem or "" for region in configured if not region.healthy} if informed else {}

    def pick(self, task_id: str) -> str:
        """The region of a task that names none."""
        table = self.table
        return table[0] if len(table) == 1 else table[zlib.crc32(task_id.encode()) % len(table)]

    def pinned(self, task_id: str, region: str, policy: str | None, now: float) -> tuple[str, ev.Event | None]:
        """Where a task pinned to ``region`` goes, and the event that says why when that is
        not a healthy region (``policy``: its ``region_failover``, None for the setting's)."""
        problem = self.unhealthy.get(region)
        if problem is None:
            return region, None
        why = f"region {region} has {problem}"
        if (policy or self.failover) == "any":
            if self.healthy:
                to = self.pick(task_id)
                return to, ev.Rerouted(task_id=task_id, at=now, region=to, requested=region, reason=f"{why}; sent to {to} (region_failover any)")
            why += " and no region is healthy"
        return region, ev.Stranded(task_id=task_id, at=now, region=region, reason=f"{why}; waiting there (region_failover {policy or self.failover})")

    def after_lookup(self, task_id: str, then: Callable[[str | None], None], failed: Callable[[BaseException], None]) -> None:
        """Find where the first copy of a redelivered task went (the region in its state in
        KV ``tasks``), then call ``then`` with it (None: no state yet); ``failed`` when the
        state could not be read (JetStream unreachable)."""

        async def lookup() -> None:
            try:
                found = await self.recorded_regions([task_id])
            except (nats.errors.Error, TimeoutError) as exc:
                failed(exc)
                return
            then(found.get(task_id))

        task = asyncio.get_running_loop().create_task(lookup())
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def recorded_regions(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The region each task's state in KV ``tasks`` names, for those that have one."""
        if self._states is None:
            self._states = await StateStore.open(self.bus)
        found: dict[str, str] = {}
        for start in range(0, len(task_ids), MAX_GET_MANY):
            states = await self._states.get_many(self.bus, task_ids[start : start + MAX_GET_MANY])
            found.update((task_id, state.region) for task_id, (state, _revision) in states.items() if state.region)
        return found
