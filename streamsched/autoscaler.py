"""``streamsched up --autoscale MIN:MAX``: as many worker processes per region as the queue needs.

The signal is the one a KEDA ScaledObject would scale a worker Deployment on: the region's
WORK durables (one per priority and task type, shared by the region's workers), summed:
``num_pending`` (tasks no worker has taken yet) and ``num_ack_pending`` (tasks workers
hold, running or waiting for a slot), against the slots of the workers ``up`` runs there
(workers x concurrency). One ``$JS.API.CONSUMER.LIST.WORK`` request per tick gives both for
every region.

The rule (:func:`desired_workers`, pure; the thresholds are ``autoscale_*`` settings):

* **busy** sample: queued + held tasks above ``autoscale_busy_load`` per slot (at 1.0,
  some task waits for a slot). ``autoscale_up_ticks`` busy samples in a row add workers:
  as many as the smallest of those loads fills, at most ``autoscale_up_step``, up to MAX.
* **idle** sample: nothing queued, and the held tasks would fill at most
  ``autoscale_idle_load`` of the slots left with one worker fewer. Idle samples only for
  ``autoscale_idle_s`` drain one worker, down to MIN.
* Only samples taken since the count last changed count, so each change waits for its own
  evidence, and since the idle share is below the busy one, the load that made a change
  cannot undo it: a signal hovering at a threshold does not make the count flap.

A worker is taken out by draining it (:func:`~streamsched.roles.worker_registry.request_drain`):
it finishes what it holds, deregisters and exits 0, and the supervisor, told it is retired,
does not restart it. SIGTERM (on which a worker drains too) follows when the drain request
finds no worker (one still starting) or the drain outlasts ``grace_s``; SIGKILL only when
the process outlives SIGTERM as well. The autoscaler ends only the processes it started.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import nats.errors

from . import subjects
from .config import Settings
from .errors import NotFound
from .roles.worker_registry import request_drain, worker_id
from .supervisor import Role, RoleProcess, Supervisor
from .transport.bus import Bus
from .transport.pull import ConsumerLoad, consumer_loads

log = logging.getLogger("streamsched.autoscale")

#: A drained worker gets ``grace_s`` and this long to exit before SIGTERM.
DRAIN_MARGIN_S = 10.0
#: After SIGTERM, this long before SIGKILL (only for a process that ignores SIGTERM).
TERM_WAIT_S = 10.0


@dataclass(frozen=True)
class Sample:
    """A region's WORK queue at one moment."""

    at: float
    """``time.monotonic()`` when taken."""
    queued: int
    """Tasks no worker has taken yet (``num_pending``)."""
    held: int
    """Tasks workers hold, running or waiting for a slot (``num_ack_pending``)."""

    @property
    def load(self) -> int:
        return self.queued + self.held


@dataclass(frozen=True)
class ScaleRule:
    """Bounds and thresholds of one region's worker count (see the module docstring)."""

    min_workers: int
    max_workers: int
    concurrency: int
    """Slots of each worker."""
    busy_load: float
    idle_load: float
    up_ticks: int
    up_step: int
    idle_s: float

    @classmethod
    def of(cls, settings: Settings, bounds: tuple[int, int], concurrency: int) -> ScaleRule:
        return cls(
            min_workers=bounds[0],
            max_workers=bounds[1],
            concurrency=concurrency,
            busy_load=settings.autoscale_busy_load,
            idle_load=settings.autoscale_idle_load,
            up_ticks=settings.autoscale_up_ticks,
            up_step=settings.autoscale_up_step,
            idle_s=settings.autoscale_idle_s,
        )

    def busy(self, sample: Sample, workers: int) -> bool:
        return sample.load > self.busy_load * workers * self.concurrency

    def idle(self, sample: Sample, workers: int) -> bool:
        return sample.queued == 0 and sample.held <= self.idle_load * (workers - 1) * self.concurrency


def parse_bounds(text: str) -> tuple[int, int]:
    """``"1:3"`` -> ``(1, 3)``; :class:`ValueError` saying what is wrong unless 1 <= MIN <= MAX."""
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"expected MIN:MAX, two whole numbers (1:4, say), not {text!r}")
    low, high = int(parts[0]), int(parts[1])
    if low < 1:
        raise ValueError(f"MIN must be at least 1, not {low} (up keeps at least one worker per region)")
    if low > high:
        raise ValueError(f"MIN ({low}) must not exceed MAX ({high})")
    return low, high


def desired_workers(samples: Sequence[Sample], current: int, rule: ScaleRule) -> int:
    """The worker count to run next, from the samples taken since the count last changed
    (oldest first) and the count now."""
    if not rule.min_workers <= current <= rule.max_workers:
        return min(max(current, rule.min_workers), rule.max_workers)
    recent = samples[-rule.up_ticks :]
    if current < rule.max_workers and len(recent) == rule.up_ticks and all(rule.busy(s, current) for s in recent):
        needed = math.ceil(min(s.load for s in recent) / (rule.busy_load * rule.concurrency))
        return min(rule.max_workers, current + rule.up_step, max(current + 1, needed))
    if current > rule.min_workers and samples:
        since = samples[-1].at - rule.idle_s
        if samples[0].at <= since and all(rule.idle(s, current) for s in samples if s.at >= since):
            return current - 1
    return current


def region_samples(loads: Iterable[ConsumerLoad], regions: Iterable[str], at: float) -> dict[str, Sample]:
    """Each region's sample from the WORK consumers' counts (other consumers are left out)."""
    totals = {region: [0, 0] for region in regions}
    for consumer in loads:
        parsed = subjects.parse_work(consumer.filter_subject)
        if parsed is None or parsed[0] not in totals or consumer.name != subjects.work_consumer(*parsed):
            continue
        total = totals[parsed[0]]
        total[0] += consumer.num_pending
        total[1] += consumer.num_ack_pending
    return {region: Sample(at=at, queued=queued, held=held) for region, (queued, held) in totals.items()}


@dataclass
class _Pool:
    """One region's workers started by the autoscaler and not retired, and its samples."""

    region: str
    workers: list[RoleProcess] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    """Taken since the count last changed, oldest first, at most the ones a decision looks at."""
    made: int = 0
    """Workers numbered so far: a new one is ``worker <region>#<made + 1>``."""


class Autoscaler:
    """Keeps each region's worker processes between MIN and MAX from the WORK backlog.

    Runs inside ``up`` (:meth:`run`, cancelled when ``up`` stops) beside the supervisor's
    polling, in the same thread: it adds roles to the supervisor and retires them there.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        settings: Settings,
        rules: Mapping[str, ScaleRule],
        worker_role: Callable[[str, int], Role],
    ) -> None:
        """``worker_role(region, n)`` is the n-th worker role of a region."""
        self.supervisor = supervisor
        self.settings = settings
        self.rules = rules
        self.worker_role = worker_role
        self.pools = {region: _Pool(region) for region in rules}
        history_s = settings.autoscale_idle_s + settings.autoscale_up_ticks * settings.autoscale_tick_s
        self._keep = math.ceil(history_s / settings.autoscale_tick_s) + 2  # samples a decision can look at
        self._sampling_failed = False

    def start(self) -> None:
        """Start MIN workers in every region."""
        for region, rule in self.rules.items():
            self._add(self.pools[region], rule.min_workers)

    async def run(self) -> None:
        """Sample and decide every ``autoscale_tick_s`` until cancelled."""
        bus = await Bus.connect(self.settings.nats_url, name="streamsched-up-autoscale")
        try:
            while True:
                await self.tick(bus)
                await anyio.sleep(self.settings.autoscale_tick_s)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await bus.close()

    async def tick(self, bus: Bus) -> None:
        """One sample of every region, and what it decides."""
        try:
            loads = await consumer_loads(bus, subjects.WORK_STREAM)
        except (nats.errors.Error, TimeoutError) as exc:  # server busy or reconnecting: no evidence this tick
            if not self._sampling_failed:
                log.warning("could not list the WORK consumers (%r); not scaling until that works again", exc)
            self._sampling_failed = True
            for pool in self.pools.values():
                pool.samples.clear()  # a gap: the idle window starts again
            return
        if self._sampling_failed:
            log.info("listing the WORK consumers works again")
            self._sampling_failed = False
        for region, sample in region_samples(loads, self.pools, time.monotonic()).items():
            await self._decide(bus, self.pools[region], self.rules[region], sample)

    async def _decide(self, bus: Bus, pool: _Pool, rule: ScaleRule, sample: Sample) -> None:
        pool.samples.append(sample)
        del pool.samples[: -self._keep]
        current = len(pool.workers)
        desired = desired_workers(pool.samples, current, rule)
        if desired == current:
            return
        pool.samples.clear()  # the next change waits for evidence at the new count
        why = f"region {pool.region}: {sample.queued} queued and {sample.held} held for {current} worker(s) x {rule.concurrency} slots"
        if desired > current:
            log.info("%s; adding %d worker(s)", why, desired - current)
            self._add(pool, desired - current)
        for _ in range(current - desired):
            log.info("%s; draining one", why)
            await self._retire(bus, pool)

    def _add(self, pool: _Pool, count: int) -> None:
        for _ in range(count):
            pool.made += 1
            pool.workers.append(self.supervisor.add(self.worker_role(pool.region, pool.made)))

    async def _retire(self, bus: Bus, pool: _Pool) -> None:
        """Drain the newest worker; SIGTERM it at once when no worker takes the request."""
        process = pool.workers.pop()
        pid = process.retire(time.monotonic(), self.settings.grace_s + DRAIN_MARGIN_S, TERM_WAIT_S)
        if pid is None:  # waiting to be restarted: nothing to stop
            log.info("%s retired while not running", process.role.name)
            return
        drained = worker_id(pid)
        try:
            await request_drain(bus, drained)
        except (NotFound, TimeoutError, nats.errors.Error) as exc:
            log.info("%s (pid %d) took no drain request (%s): SIGTERM, on which it drains too", process.role.name, pid, exc)
            process.terminate()
        else:
            log.info("%s (pid %d, worker %s) draining", process.role.name, pid, drained)
