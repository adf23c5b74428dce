"""The masters' circuit-breaker loop (see :mod:`streamsched.roles.breakers` for the states).

Every master runs a :class:`BreakerKeeper`. Every ``worker_heartbeat_s`` it takes the live
workers' per-type outcome counters (their KV ``workers`` entries, mirrored by
:class:`~streamsched.roles.worker_registry.LiveWorkers`; cumulative since each worker
started), turns them into the attempts finished since the last tick per region and type
(:class:`OutcomeDiff`), adds them to a :class:`~streamsched.roles.breakers.Tally` per
breaker, asks :func:`~streamsched.roles.breakers.decide`, and writes a change by compare
and set: with several masters the first writer wins and the others follow its state, as
every master mirrors KV ``breakers``. Then it puts every breaker that is not closed (or
closed lately) into effect on WORK again. Nothing of this is on the per-task path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import anyio

from .. import subjects
from ..config import Settings
from ..transport.bus import Bus
from ..transport.kv_watch import BucketWatch
from .breakers import FAILURES, Breaker, Decision, Tally, breakers_bucket, decide, decode, enforce, write_change
from .worker_registry import LiveWorkers, WorkerInfo

log = logging.getLogger("streamsched.breakers")

#: Seconds :meth:`BreakerKeeper.run` waits for the breakers already stored.
LOAD_TIMEOUT_S = 5.0


class OutcomeDiff:
    """Attempts finished between two calls of :meth:`step`, per (region, type), from the
    workers' cumulative counters. A worker first seen is counted from zero if it started
    after this object was made (its every attempt is new), else only from now on; a counter
    that went down belongs to a worker restarted under the same id, counted from zero."""

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self._last: dict[str, tuple[float, dict[str, dict[str, int]]]] = {}

    def step(self, workers: Iterable[WorkerInfo]) -> dict[tuple[str, str], tuple[int, int]]:
        """(succeeded, failed) per (region, type) since the last step."""
        found: dict[tuple[str, str], tuple[int, int]] = {}
        last: dict[str, tuple[float, dict[str, dict[str, int]]]] = {}
        for info in workers:
            previous = self._last.get(info.key)
            if previous is not None and previous[0] == info.started_at:
                baseline = previous[1]
            elif info.started_at >= self.started_at:
                baseline = {}
            else:
                baseline = info.outcomes
            last[info.key] = (info.started_at, info.outcomes)
            for task_type, counts in info.outcomes.items():
                before = baseline.get(task_type, {})
                succeeded = _grown(counts, before, "succeeded")
                failed = sum(_grown(counts, before, outcome) for outcome in FAILURES)
                if succeeded or failed:
                    had = found.get((info.region, task_type), (0, 0))
                    found[info.region, task_type] = (had[0] + succeeded, had[1] + failed)
        self._last = last
        return found


def _grown(now: dict[str, int], before: dict[str, int], outcome: str) -> int:
    current, earlier = now.get(outcome, 0), before.get(outcome, 0)
    return current - earlier if current >= earlier else current


class BreakerKeeper:
    """A master's breaker loop (see the module)."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.workers = LiveWorkers(bus)
        self.breakers: dict[str, Breaker] = {}
        """KV ``breakers`` as mirrored, by key."""
        self.tallies: dict[tuple[str, str], tuple[float, Tally]] = {}
        """Per (region, type): the ``since`` of the breaker state it counts for, and the tally."""
        self._watch = BucketWatch(bus, subjects.BREAKERS_BUCKET, self._on_change)
        self._diff = OutcomeDiff(time.time())
        self._stopped = anyio.Event()
        self.ticks = 0  # passes done (attempted), for whoever waits for a few of them

    def _on_change(self, key: str, value: bytes | None) -> None:
        breaker = None if value is None else decode(value)
        if breaker is None:
            self.breakers.pop(key, None)
        else:
            self.breakers[key] = breaker

    async def run(self) -> None:
        await breakers_bucket(self.bus)  # says what to do when the bucket is missing
        await self.workers.start()
        if not await self._watch.start(LOAD_TIMEOUT_S):
            log.warning("breakers not all loaded after %.0fs; going on, the rest follow", LOAD_TIMEOUT_S)
        interval = self.settings.worker_heartbeat_s
        try:
            while not self._stopped.is_set():
                try:
                    await self.tick(time.time())
                except Exception as exc:  # noqa: BLE001 - slow or disconnected: the next tick tries again
                    log.warning("breaker pass failed (%r); trying again in %.1fs", exc, interval)
                self.ticks += 1
                with anyio.move_on_after(interval):
                    await self._stopped.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._watch.stop()
                await self.workers.stop()

    async def shutdown(self) -> None:
        self._stopped.set()

    async def tick(self, now: float) -> None:
        """Count, decide, write what changed, and put every breaker not closed into effect."""
        finished = self._diff.step(self.workers.workers())
        kv = None
        keys = set(finished) | {(breaker.region, breaker.type) for breaker in self.breakers.values()}
        for region, task_type in keys:
            breaker = self.breakers.get(subjects.breaker_key(region, task_type)) or Breaker(region=region, type=task_type)
            since, tally = self.tallies.get((region, task_type), (breaker.since, Tally()))
            if since != breaker.since:  # it changed state: count afresh
                tally = Tally()
            succeeded, failed = finished.get((region, task_type), (0, 0))
            tally.add(now, succeeded, failed, self.settings.breaker_window_s)
            self.tallies[region, task_type] = (breaker.since, tally)
            decision = decide(breaker, tally, now, self.settings)
            if decision is not None:
                kv = kv or await breakers_bucket(self.bus)

                def moved(current: Breaker, seen: Breaker = breaker, tally: Tally = tally, decision: Decision = decision) -> Breaker | None:
                    if current.since != seen.since:  # another master changed it meanwhile: its state stands
                        return None
                    return current.moved_to(decision.state, now, decision.reason, until=decision.until, tally=tally)

                written = await write_change(kv, region, task_type, moved)
                if written is not None:
                    self.breakers[subjects.breaker_key(region, task_type)] = written
                    self.tallies[region, task_type] = (written.since, Tally())
                    breaker = written
            if breaker.since:
                await enforce(self.bus, self.settings, breaker, now)
