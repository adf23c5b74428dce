"""Circuit breakers per task type and region: the records in KV ``breakers``, the rules, and
how a state is put into effect on WORK.

A breaker is ``closed`` (its type flows), ``open`` (nothing of its type is delivered in its
region until ``until``) or ``half-open`` (a few probes at a time). The masters decide
(:mod:`streamsched.roles.breaker_keeper`) from the attempts the workers report in their
registry entries; :func:`decide` is the rule, a pure function of the breaker and a
:class:`Tally` of what finished.

Enforcement is on the WORK durables of the type's region, one per priority, so nothing is
added to the per-task path and nothing is lost:

* ``open``: each durable is paused (JetStream's consumer pause) until a little past the
  cool-down's end. Its tasks stay on WORK undelivered: not started, not failed, not
  dead-lettered, their attempt counts untouched. The pause outlasts the cool-down by
  :data:`PAUSE_MARGIN_HEARTBEATS` heartbeats so that the durable does not resume at full
  speed before a master has set the half-open limit; should every master be gone, it
  resumes by itself then.
* ``half-open``: the durables get ``max_ack_pending`` = ``breaker_probes`` and resume: at
  most that many tasks of the type per priority are delivered and not yet settled at once.
  A probe that fails follows its retry policy like any attempt (it was a real run).
* ``closed``: the durables get their normal config back and resume.

A worker that starts re-creates its durables with the normal config (an update in place,
which keeps a pause but resets ``max_ack_pending``), and a reprioritize move pauses a
durable for a moment: so the masters apply the state of every breaker that is not closed
(and of one closed lately) every heartbeat, not only when it changes.

A state change is recorded in the breaker's own ``history`` (the last :data:`HISTORY`
changes) and logged. It is not an event in EVENTS: events are facts about a task, folded
by task id into KV ``tasks``, and a breaker is not a task.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from .. import subjects
from ..config import Settings
from ..transport.answering import when_answered
from ..transport.bus import Bus
from ..transport.kv_watch import bucket_values
from ..transport.streams import work_consumer_config
from .placement import rfc3339

log = logging.getLogger("streamsched.breakers")

BreakerState = Literal["closed", "open", "half-open"]

#: State changes a breaker keeps in its ``history``.
HISTORY = 20
#: Heartbeats an open breaker's pause outlasts its cool-down (see the module).
PAUSE_MARGIN_HEARTBEATS = 3
#: How long a breaker forced open without an end pauses its durables for at a time (re-set every heartbeat).
INDEFINITE_PAUSE_S = 86_400.0
#: Heartbeats after closing during which the masters still put the normal config back.
SETTLE_HEARTBEATS = 10
#: Outcomes that count as a failed attempt (``cancelled`` counts as neither).
FAILURES = ("retrying", "failed", "dead")


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One state change of a breaker."""

    at: float
    state: BreakerState
    reason: str
    forced: bool = False


class Breaker(msgspec.Struct, frozen=True, kw_only=True):
    """A breaker's value in KV ``breakers`` (JSON), under :func:`~streamsched.subjects.breaker_key`."""

    region: str
    type: str
    state: BreakerState = "closed"
    since: float = 0.0
    """When it entered this state."""
    until: float = 0.0
    """``open``: when it half-opens; 0 for one forced open until forced closed."""
    reason: str = ""
    forced: bool = False
    """Set by ``streamsched breakers open/close`` rather than by the rules."""
    succeeded: int = 0
    failed: int = 0
    """What the deciding master had counted when it changed state (in the window, or the run)."""
    history: tuple[Change, ...] = ()
    """The last :data:`HISTORY` changes, oldest first."""

    def moved_to(
        self, state: BreakerState, now: float, reason: str, *, until: float = 0.0, forced: bool = False, tally: Tally | None = None
    ) -> Breaker:
        """This breaker in ``state`` from ``now``."""
        change = Change(at=now, state=state, reason=reason, forced=forced)
        succeeded, failed = (tally.window_succeeded, tally.window_failed) if tally is not None else (0, 0)
        if tally is not None and tally.run > failed:
            failed = tally.run
        return msgspec.structs.replace(
            self,
            state=state,
            since=now,
            until=until,
            reason=reason,
            forced=forced,
            succeeded=succeeded,
            failed=failed,
            history=(*self.history, change)[-HISTORY:],
        )


_decoder = msgspec.json.Decoder(Breaker)


def decode(data: bytes) -> Breaker | None:
    """The breaker, or None for a value no breaker of this version wrote."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError:
        return None


@dataclass
class Tally:
    """What a master counted of one type in one region since the breaker last changed state."""

    run: int = 0
    """Failed attempts since the last success."""
    succeeded: int = 0
    failed: int = 0
    """Attempts finished since the breaker entered its state (what a half-open breaker weighs)."""
    samples: collections.deque[tuple[float, int, int]] = field(default_factory=collections.deque)
    """(when, succeeded, failed) per heartbeat with any, within ``breaker_window_s``."""

    def add(self, now: float, succeeded: int, failed: int, window_s: float) -> None:
        if succeeded:
            self.run = 0
        self.run += failed  # failures reported with a success in one heartbeat may follow it: a run stays a run
        self.succeeded += succeeded
        self.failed += failed
        if succeeded or failed:
            self.samples.append((now, succeeded, failed))
        while self.samples and self.samples[0][0] <= now - window_s:
            self.samples.popleft()

    @property
    def window_succeeded(self) -> int:
        return sum(sample[1] for sample in self.samples)

    @property
    def window_failed(self) -> int:
        return sum(sample[2] for sample in self.samples)


@dataclass(frozen=True)
class Decision:
    """A state change :func:`decide` asks for."""

    state: BreakerState
    reason: str
    until: float = 0.0


def decide(breaker: Breaker, tally: Tally, now: float, settings: Settings) -> Decision | None:
    """The state ``breaker`` should move to, given ``tally``, or None to stay (pure).

    closed → open on ``breaker_failures_in_row`` failures with no success between, or on a
    failure share of at least ``breaker_failure_rate`` over ``breaker_window_s`` with at
    least ``breaker_min_tasks`` attempts; open → half-open once ``until`` has passed (never
    for one forced open without an end); half-open → open on any failure, → closed on a
    success with none.
    """
    cooldown_end = now + settings.breaker_cooldown_s
    if breaker.state == "closed":
        if settings.breaker_failures_in_row and tally.run >= settings.breaker_failures_in_row:
            return Decision("open", f"{tally.run} failures in a row", cooldown_end)
        if settings.breaker_failure_rate:
            failed = tally.window_failed
            total = failed + tally.window_succeeded
            if total >= settings.breaker_min_tasks and failed >= settings.breaker_failure_rate * total:
                return Decision("open", f"{failed} of {total} attempts failed within {settings.breaker_window_s:g}s", cooldown_end)
        return None
    if breaker.state == "open":
        if breaker.until and now >= breaker.until:
            return Decision("half-open", f"cool-down over: up to {settings.breaker_probes} probe(s) at a time")
        return None
    if tally.failed:
        return Decision("open", f"{tally.failed} probe(s) failed", cooldown_end)
    if tally.succeeded:
        return Decision("closed", f"{tally.succeeded} probe(s) succeeded")
    return None


async def breakers_bucket(bus: Bus) -> KeyValue:
    try:
        return await when_answered(lambda: bus.js.key_value(subjects.BREAKERS_BUCKET), "for KV breakers")
    except NotFoundError:
        log.error("no KV bucket %s: run `streamsched streams apply` (this version needs it)", subjects.BREAKERS_BUCKET)
        raise


async def read_breakers(bus: Bus) -> list[Breaker]:
    """Every breaker in KV ``breakers``, by region and type."""
    found = (decode(value) for value in (await bucket_values(bus, subjects.BREAKERS_BUCKET)).values())
    return sorted((breaker for breaker in found if breaker is not None), key=lambda b: (b.region, b.type))


async def write_change(kv: KeyValue, region: str, task_type: str, change: collections.abc.Callable[[Breaker], Breaker | None]) -> Breaker | None:
    """Apply ``change`` to the stored breaker (a closed one if none is stored) by compare and
    set; the breaker written, or None when ``change`` wants nothing or another writer got
    there first (the first writer wins: the others see its state when they next read)."""
    key = subjects.breaker_key(region, task_type)
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        entry = None
    stored = decode(entry.value or b"") if entry is not None else None
    current = stored if stored is not None else Breaker(region=region, type=task_type)
    changed = change(current)
    if changed is None:
        return None
    value = msgspec.json.encode(changed)
    try:
        if entry is None:
            await kv.create(key, value)
        else:
            await kv.update(key, value, last=entry.revision)
    except KeyWrongLastSequenceError:
        return None
    log.warning(
        "breaker %s in %s: %s -> %s%s (%s)",
        task_type,
        region,
        current.state,
        changed.state,
        " (forced)" if changed.forced else "",
        changed.reason,
    )
    return changed


async def force(bus: Bus, settings: Settings, region: str, task_type: str, state: Literal["open", "closed"], for_s: float | None = None) -> Breaker:
    """Force a breaker open (for ``for_s``, then it half-opens; without, until forced closed)
    or closed, and put that into effect at once; the breaker as written."""
    kv = await breakers_bucket(bus)
    while True:
        now = time.time()
        until = now + for_s if state == "open" and for_s else 0.0

        def forced(current: Breaker, now: float = now, until: float = until) -> Breaker:
            return current.moved_to(state, now, "forced by an operator", until=until, forced=True)

        written = await write_change(kv, region, task_type, forced)
        if written is not None:
            await enforce(bus, settings, written, now)
            return written


async def enforce(bus: Bus, settings: Settings, breaker: Breaker, now: float) -> None:
    """Put ``breaker``'s state into effect on its WORK durables (see the module); durables no
    worker has made yet are skipped (nothing is delivered from them)."""
    js = bus.js
    for priority in settings.priorities:
        durable = subjects.work_consumer(breaker.region, priority, breaker.type)
        try:
            if breaker.state == "open":
                end = breaker.until + PAUSE_MARGIN_HEARTBEATS * settings.worker_heartbeat_s if breaker.until else now + INDEFINITE_PAUSE_S
                await js.pause_consumer(subjects.WORK_STREAM, durable, rfc3339(end))
                continue
            if breaker.state == "closed" and now - breaker.since > SETTLE_HEARTBEATS * settings.worker_heartbeat_s:
                continue
            config = work_consumer_config(settings, breaker.region, priority, breaker.type)
            if breaker.state == "half-open":
                config.max_ack_pending = settings.breaker_probes
            info = await js.consumer_info(subjects.WORK_STREAM, durable)
            if info.config.max_ack_pending != config.max_ack_pending:
                await js.add_consumer(subjects.WORK_STREAM, config)  # an update in place: a pause stays
            if info.paused:  # the open state's pause (or a reprioritize move's, which is safe to lift: see there)
                await js.resume_consumer(subjects.WORK_STREAM, durable)
        except NotFoundError:
            continue
