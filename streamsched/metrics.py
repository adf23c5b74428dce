"""The cluster's Prometheus metrics: the API's ``/metrics``, one view of every role process.

Two sources, each chosen so that the view is exact however many processes each role runs,
and costs the roles nothing:

* **Counters and histograms are folded from EVENTS.** Every lifecycle step is an event
  (:mod:`streamsched.eventlog.events`), so the API process follows EVENTS from its own
  start and counts ``submitted``, ``rejected``, ``retrying``, ``succeeded``, ``failed``,
  ``dead`` and ``cancelled`` by task type, priority and region (``tasks_*_total``). A step
  recorded twice (a hop redelivered after a crash, a cancel met by two roles) is counted
  once. Timings need the time of a task's earlier events: :class:`EventFold` keeps, per
  unfinished task, its labels and those times in a map bounded by ``metrics_max_tasks``
  (the oldest task leaves it first; its counts stay exact, its later timings are not
  observed). A task submitted before the API started gets its labels from the API's task
  list (KV ``tasks``).
* **Gauges are read from JetStream when scraped**: ``queue_size`` from the consumers' info
  (nothing is counted in a process, so a restart loses nothing), ``worker_count`` from KV
  ``workers``, ``breaker_state`` from KV ``breakers``, ``projector_lag_*`` from the projector's
  durable on EVENTS.

Counters restart from zero when the API process does (Prometheus' ``rate()`` expects that).
Task types past ``metrics_max_types`` are labelled ``other``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from . import subjects
from .client import Client
from .config import Settings
from .eventlog import events as ev
from .eventlog.reader import decode
from .queues import STAGES, queue_depths
from .roles.metrics import OTHER, Buckets, TypeLabels, histogram
from .task_index import TaskIndex
from .transport import streams
from .transport.bus import Bus
from .transport.reading import ReadStats, Since, read

log = logging.getLogger("streamsched.metrics")

#: Labels of every ``tasks_*_total`` counter and of the duration and wait histograms.
TASK_LABELS = ("type", "priority", "region")
Labels = tuple[str, str, str]
K = TypeVar("K")
#: Event kind -> the counter it adds one to.
COUNTED = {
    "submitted": "tasks_submitted",
    "rejected": "tasks_rejected",
    "retrying": "tasks_retried",
    "succeeded": "tasks_completed",
    "failed": "tasks_failed",
    "dead": "tasks_dead",
    "cancelled": "tasks_cancelled",
}
COUNTER_HELP = {
    "tasks_submitted": "Tasks a master accepted",
    "tasks_rejected": "Submissions a master rejected (invalid)",
    "tasks_retried": "Attempts that failed and come back later",
    "tasks_completed": "Tasks that succeeded",
    "tasks_failed": "Tasks that failed permanently (the handler said not to retry)",
    "tasks_dead": "Tasks whose attempts ran out (on the DLQ)",
    "tasks_cancelled": "Tasks cancelled",
}
#: The steps a task moves through; ``task_hop_seconds{hop="<from>_to_<to>"}`` times each move
#: between two of them (the others, progress and notes, are no hop).
HOP_KINDS = frozenset({"submitted", "waiting", "scheduled", "dispatched", "held", "started", "retrying", "succeeded", "failed", "dead", "cancelled"})
#: Outcomes that end an attempt that started: its run time is a ``task_duration_seconds``.
ATTEMPT_ENDS = frozenset({"succeeded", "failed", "dead", "retrying", "cancelled"})
_BIT = {kind: 1 << i for i, kind in enumerate(ev.KINDS)}
#: Kinds after which an accepted task never changes again (``rejected`` is counted apart).
_FINAL_KINDS = frozenset({"succeeded", "failed", "dead", "cancelled"})
#: What a task's labels are when neither its events nor the task list know them.
UNKNOWN = "unknown"


class _Followed:
    """What the fold keeps of one unfinished task."""

    __slots__ = ("attempt", "labels", "last_at", "last_kind", "seen", "started_at", "submitted_at", "type_label", "waited")

    def __init__(self, labels: Labels) -> None:
        self.labels = labels
        self.attempt = 0
        self.seen = 0  # bits of the kinds seen in this attempt (a second one is a copy)
        self.submitted_at = 0.0
        self.started_at = 0.0
        self.last_kind = ""
        self.last_at = 0.0
        self.waited = False
        self.type_label = labels[0]


class _Original(msgspec.Struct):
    """What a rejected submission's labels are read from, when its bytes say."""

    type: str = UNKNOWN
    priority: str = ""
    region: str = ""


_original_decoder = msgspec.json.Decoder(_Original)


class EventFold(Collector):
    """Counters and histograms folded from EVENTS (see the module); a prometheus-client
    collector. Fed and read on one event loop's thread."""

    def __init__(self, settings: Settings, labels_of: Callable[[str], Labels | None] = lambda _: None) -> None:
        """``labels_of(task_id)``: a task's (type, priority, region) from elsewhere (the task
        list), for the events of tasks submitted before the fold began."""
        self.types = TypeLabels(settings.metrics_max_types)
        self.max_tasks = settings.metrics_max_tasks
        self.labels_of = labels_of
        self.counts: dict[str, dict[Labels, int]] = {name: {} for name in COUNTER_HELP}
        self.waits: dict[Labels, Buckets] = {}
        self.durations: dict[Labels, Buckets] = {}
        self.hops: dict[str, Buckets] = {}
        self.tasks: dict[str, _Followed] = {}
        self.finished: dict[str, None] = {}  # recent final ones: a later copy of their end is not counted again
        self.events = 0

    def observe(self, event: ev.Event) -> None:
        """Fold one event."""
        self.events += 1
        kind = ev.kind(event)
        task_id = event.task_id
        if isinstance(event, ev.Rejected):
            self._rejected(event)
            return
        if task_id in self.finished:
            return
        task = self.tasks.get(task_id)
        if task is None:
            task = self._follow(event)
        if kind in ev.REPEATABLE:
            if isinstance(event, ev.Reprioritized):
                task.labels = (task.labels[0], event.priority, task.labels[2])
            return
        bit = _BIT[kind]
        if event.attempt > task.attempt:
            task.attempt, task.seen = event.attempt, 0
        elif event.attempt == task.attempt and task.seen & bit:
            return  # recorded again by a redelivered hop
        task.seen |= bit
        if isinstance(event, ev.Scheduled | ev.Dispatched | ev.Held):
            task.labels = (task.labels[0], event.priority, event.region or task.labels[2])
        counter = COUNTED.get(kind)
        if counter is not None:
            counts = self.counts[counter]
            counts[task.labels] = counts.get(task.labels, 0) + 1
        self._time(task, kind, event)
        if kind in _FINAL_KINDS:
            del self.tasks[task_id]
            self.finished[task_id] = None
            if len(self.finished) > self.max_tasks:
                del self.finished[next(iter(self.finished))]

    def _follow(self, event: ev.Event) -> _Followed:
        if isinstance(event, ev.Submitted):
            labels: Labels = (self.types(event.type), event.priority, event.region)
        else:
            labels = self.labels_of(event.task_id) or (UNKNOWN, getattr(event, "priority", ""), event.region)
            labels = (self.types(labels[0]) if labels[0] != UNKNOWN else UNKNOWN, labels[1], labels[2])
        task = self.tasks[event.task_id] = _Followed(labels)
        if len(self.tasks) > self.max_tasks:
            del self.tasks[next(iter(self.tasks))]
        return task

    def _rejected(self, event: ev.Rejected) -> None:
        key = event.task_id + "\x00rejected"  # a copy of the same rejection is not counted again
        if key in self.finished:
            return
        self.finished[key] = None
        try:
            original = _original_decoder.decode(event.original)
        except msgspec.DecodeError:
            original = _Original()
        type_label = self.types(original.type) if isinstance(original.type, str) and original.type != UNKNOWN else UNKNOWN
        labels = (type_label, original.priority, original.region)
        counts = self.counts["tasks_rejected"]
        counts[labels] = counts.get(labels, 0) + 1

    def _time(self, task: _Followed, kind: str, event: ev.Event) -> None:
        at = event.at
        if kind == "submitted":
            task.submitted_at = at
        elif kind == "started":
            task.started_at = at
            if not task.waited and task.submitted_at:
                task.waited = True
                _buckets(self.waits, task.labels).observe(max(0.0, at - task.submitted_at))
        elif kind in ATTEMPT_ENDS and task.started_at:
            run = event.duration_s if isinstance(event, ev.Succeeded) and event.duration_s else at - task.started_at
            _buckets(self.durations, task.labels).observe(max(0.0, run))
            task.started_at = 0.0
        if kind in HOP_KINDS:
            if task.last_kind and at >= task.last_at:
                _buckets(self.hops, f"{task.last_kind}_to_{kind}").observe(at - task.last_at)
            task.last_kind, task.last_at = kind, at

    def collect(self) -> Iterator[Metric]:
        for name, documentation in COUNTER_HELP.items():
            family = CounterMetricFamily(name, documentation, labels=TASK_LABELS)
            for labels, count in sorted(self.counts[name].items()):
                family.add_metric(list(labels), count)
            yield family
        yield histogram(
            "task_wait_seconds", "From submission to the first start (queued, delayed, held, waiting)", TASK_LABELS, sorted(self.waits.items())
        )
        yield histogram("task_duration_seconds", "Run time of each attempt that started, to its outcome", TASK_LABELS, sorted(self.durations.items()))
        yield histogram(
            "task_hop_seconds",
            "Time from one step of a task to the next, by hop (<from>_to_<to>)",
            ("hop",),
            [((hop,), b) for hop, b in sorted(self.hops.items())],
        )
        followed = GaugeMetricFamily("metrics_tasks_followed", "Unfinished tasks the fold keeps timings of (bounded by metrics_max_tasks)")
        followed.add_metric([], len(self.tasks))
        yield followed
        folded = CounterMetricFamily("metrics_events_folded", "Events the API's metrics folded since it started")
        folded.add_metric([], self.events)
        yield folded


def _buckets(by: dict[K, Buckets], key: K) -> Buckets:
    found = by.get(key)
    if found is None:
        found = by[key] = Buckets()
    return found


async def follow(bus: Bus, fold: EventFold, since: Since, *, retry_s: float = 1.0) -> None:
    """Fold every EVENTS message from ``since`` on, until cancelled. A failed read (NATS
    away) is started again after the last message folded, so nothing is counted twice or missed."""
    stats = ReadStats()
    while True:
        try:
            async for stored in read(bus, subjects.EVENTS_STREAM, subjects.EVENTS_ALL, since, follow=True, stats=stats):
                since = Since(seq=stored.seq + 1)  # before folding: a message the fold fails on is not read again and again
                for event in decode(stored.seq, stored.data, stats):
                    fold.observe(event)
        except Exception as exc:  # noqa: BLE001 - whatever stopped the read, the counters must go on: read again from the last message
            log.warning("following EVENTS for the metrics failed (%r); again in %.1fs", exc, retry_s)
            await asyncio.sleep(retry_s)


@dataclass
class ClusterMetrics:
    """The API process's metrics: the fold (fed by a task following EVENTS) and the gauges
    read at each scrape. :meth:`start`, :meth:`render`, :meth:`stop`."""

    client: Client
    index: TaskIndex
    fold: EventFold
    following: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, client: Client, index: TaskIndex) -> ClusterMetrics:
        """Begin folding EVENTS from now (stored from this moment on, read as they come)."""

        def labels_of(task_id: str) -> Labels | None:
            entry = index.entries.get(task_id)
            if entry is None:
                return None
            return (entry.type or UNKNOWN, entry.priority or "", entry.region or "")

        metrics = cls(client, index, EventFold(client.settings, labels_of))
        since = Since(time=datetime.now(UTC))
        metrics.following = asyncio.get_running_loop().create_task(follow(client.bus, metrics.fold, since))
        return metrics

    async def stop(self) -> None:
        if self.following is not None:
            self.following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.following

    async def render(self) -> bytes:
        """The Prometheus text of everything: the fold, the gauges read now, this process."""
        registry = CollectorRegistry()
        registry.register(self.fold)
        registry.register(_Fixed(await cluster_gauges(self.client, self.index, self.fold.types)))
        ProcessCollector(registry=registry)
        return generate_latest(registry)


class _Fixed(Collector):
    """Metric families read already."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


#: The streams whose messages, bytes and byte limit ``/metrics`` shows: every one with a
#: ``max_bytes`` setting, so that an alert can fire before a stream that discards new
#: messages (TASKS, SCHED, FINISHED, WORK, KV ``tasks``) starts refusing them.
LIMITED_STREAMS = (
    subjects.TASKS_STREAM,
    subjects.SCHED_STREAM,
    subjects.FINISHED_STREAM,
    subjects.WORK_STREAM,
    subjects.EVENTS_STREAM,
    subjects.DLQ_STREAM,
    f"KV_{subjects.STATE_BUCKET}",
)


async def cluster_gauges(client: Client, index: TaskIndex, types: TypeLabels) -> list[Metric]:
    """The gauges read from JetStream and the KV buckets now (see the module)."""
    settings, bus = client.settings, client.bus
    live = await client.workers()
    out: list[Metric] = [await queue_sizes(bus, settings)]
    workers = GaugeMetricFamily("worker_count", "Live workers (entries in KV workers) by region", labels=["region"])
    by_region = dict.fromkeys(settings.regions, 0)
    for worker in live:
        by_region[worker.region] = by_region.get(worker.region, 0) + 1
    for region, count in sorted(by_region.items()):
        workers.add_metric([region], count)
    out.append(workers)
    out.append(await breaker_states(client, types))
    out.extend(await projector_lag(bus))
    # The API's own view and the streams' depths, as ``streamsched_*``.
    tasks = GaugeMetricFamily("streamsched_tasks", "Tasks in the API's view of KV tasks, by status", labels=["status"])
    for status, count in index.counts().items():
        tasks.add_metric([status], count)
    messages = GaugeMetricFamily("streamsched_stream_messages", "Messages each stream holds", labels=["stream"])
    stored = GaugeMetricFamily("streamsched_stream_bytes", "Bytes each stream holds", labels=["stream"])
    limits = GaugeMetricFamily("streamsched_stream_max_bytes", "Each stream's byte limit (its max_bytes setting; 0: none)", labels=["stream"])
    for stream in LIMITED_STREAMS:
        info = await bus.js.stream_info(stream)
        messages.add_metric([stream], info.state.messages)
        stored.add_metric([stream], info.state.bytes)
        limits.add_metric([stream], max(0, info.config.max_bytes or 0))
    out += [
        tasks,
        messages,
        stored,
        limits,
        GaugeMetricFamily("streamsched_workers", "Live workers", value=len(live)),
        GaugeMetricFamily("streamsched_tasks_running", "Tasks the live workers run now", value=sum(worker.running for worker in live)),
    ]
    return out


async def queue_sizes(bus: Bus, settings: Settings) -> GaugeMetricFamily:
    """``queue_size{region, priority, stage}``: :func:`~streamsched.queues.queue_depths`
    summed over task types, every stage of every configured region and priority present."""
    family = GaugeMetricFamily(
        "queue_size", "Tasks (SCHED: messages) waiting at each stage, by region and priority", labels=["region", "priority", "stage"]
    )
    sizes = {(region, priority, stage): 0 for region in settings.regions for priority in settings.priorities for stage in STAGES[1:]}
    for depth in await queue_depths(bus, settings):
        key = (depth.region, depth.priority, depth.stage)
        sizes[key] = sizes.get(key, 0) + depth.tasks
    for (region, priority, stage), size in sorted(sizes.items()):
        family.add_metric([region, priority, stage], size)
    return family


#: A breaker's states; ``breaker_state`` is 1 for the one it is in, 0 for the others.
BREAKER_STATES = ("closed", "open", "half-open")


async def breaker_states(client: Client, types: TypeLabels) -> GaugeMetricFamily:
    """``breaker_state{region, type, state}`` of every breaker that ever opened (KV ``breakers``)."""
    family = GaugeMetricFamily("breaker_state", "Circuit breakers: 1 for the state each is in", labels=["region", "type", "state"])
    seen: set[tuple[str, str]] = set()
    for breaker in await client.breakers():
        type_label = types(breaker.type)
        if (breaker.region, type_label) in seen:  # types past the cap share ``other``: its first breaker speaks for them
            continue
        seen.add((breaker.region, type_label))
        for state in BREAKER_STATES:
            family.add_metric([breaker.region, type_label, state], 1.0 if breaker.state == state else 0.0)
    return family


async def projector_lag(bus: Bus) -> list[GaugeMetricFamily]:
    """How far the projectors are behind EVENTS: messages not acked, summed over the
    projector durables there are, and the age of the oldest (of the one furthest behind)."""
    messages = GaugeMetricFamily("projector_lag_messages", "EVENTS messages the projectors have not folded yet")
    seconds = GaugeMetricFamily("projector_lag_seconds", "Age of the oldest EVENTS message the projectors have not folded (0: none)")
    try:
        durables = await streams.projector_durables(bus)
    except NotFoundError:  # no EVENTS yet
        return []
    if not durables:
        return []
    total, oldest_age = 0, 0.0
    for info in durables:
        behind = (info.num_pending or 0) + (info.num_ack_pending or 0)
        total += behind
        if behind and info.ack_floor is not None:
            oldest_age = max(oldest_age, await _oldest_unfolded_age(bus, info))
    messages.add_metric([], total)
    seconds.add_metric([], oldest_age)
    return [messages, seconds]


async def _oldest_unfolded_age(bus: Bus, info: ConsumerInfo) -> float:
    """Age of the first message past ``info``'s ack floor on its filter subjects: a
    partition's durable reads only some of EVENTS' messages."""
    assert info.ack_floor is not None
    ages = [0.0]
    for subject in streams.event_filters(info):
        with contextlib.suppress(NotFoundError):  # none, or gone (EVENTS' age limit): no age to tell
            oldest = await bus.js.get_msg(subjects.EVENTS_STREAM, seq=info.ack_floor.stream_seq + 1, subject=subject, next=True, direct=True)
            if oldest.time is not None:
                ages.append(time.time() - oldest.time.timestamp())
    return max(ages)


__all__ = ["OTHER", "ClusterMetrics", "EventFold", "cluster_gauges"]
