"""A role process's own ``/metrics``: what this process did, read when it is scraped.

Every role command takes ``--metrics-port`` (or ``STREAMSCHED_METRICS_PORT``; 0, the default,
serves none). The endpoint is prometheus-client's threading WSGI server on a thread, on
``metrics_host`` (loopback unless configured); a role command serves the process's
``/health`` and ``/ready`` there too (:mod:`streamsched.roles.health`), for Kubernetes' probes.

Nothing here is on the per-task path: the collectors read, at scrape time, the counts the
roles keep for themselves anyway (a worker's finished attempts by type and outcome, which
its registry entry already carries; a master's accepted and rejected submissions; the
projector's folded event messages; each puller's held messages). The one addition to a task's path
is the worker's :class:`Buckets` of handler durations: one dict lookup, one ``bisect`` and two
additions per succeeded task.

The cluster-wide view, every counter labelled by type, priority and region and exact
across any number of processes, is the API's ``/metrics`` (:mod:`streamsched.metrics`),
folded from EVENTS: sum one or the other in a query, never both.
"""

from __future__ import annotations

import bisect
import logging
import math
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .health import Health, with_probes

if TYPE_CHECKING:
    from .master import Master
    from .projector import Projector
    from .regional import Regional
    from .worker import Worker

log = logging.getLogger("streamsched.metrics")

#: The label of every task type past the cap (``metrics_max_types``).
OTHER = "other"
#: Upper bounds (seconds) of the duration, wait and hop histograms: 1 ms to 10 min.
SECONDS_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
#: The outcome of a finished attempt -> the counter it adds to (the names the cluster view uses too).
OUTCOME_COUNTERS = {
    "succeeded": "tasks_completed",
    "failed": "tasks_failed",
    "retrying": "tasks_retried",
    "dead": "tasks_dead",
    "cancelled": "tasks_cancelled",
}


class TypeLabels:
    """Task types as label values, at most ``cap`` distinct ones: a type first seen once the
    cap is reached is :data:`OTHER`, so a stream of made-up types cannot grow the series
    without bound. Known types stay themselves."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._known: dict[str, str] = {}

    def __call__(self, task_type: str) -> str:
        label = self._known.get(task_type)
        if label is None:
            label = task_type if len(self._known) < self.cap else OTHER
            if label is not OTHER:
                self._known[task_type] = label
        return label


class Buckets:
    """A histogram without locks or label objects: counts per bucket of :data:`SECONDS_BUCKETS`
    (the last one +Inf), and the sum. For one event loop's thread; read by :meth:`family`."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(SECONDS_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as a Prometheus histogram has them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*SECONDS_BUCKETS, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), running))
        return out


def histogram(name: str, documentation: str, labels: Sequence[str], series: Iterable[tuple[Sequence[str], Buckets]]) -> HistogramMetricFamily:
    """One histogram family of ``series`` (label values, buckets)."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, buckets in series:
        family.add_metric(list(values), buckets.buckets(), buckets.total)
    return family


class WorkerCollector(Collector):
    """A worker's finished attempts by type and outcome (the counts it keeps for its
    registry entry), its handler durations, and what it runs and holds now."""

    def __init__(self, worker: Worker, types: TypeLabels) -> None:
        self.worker = worker
        self.types = types

    def collect(self) -> Iterator[Metric]:
        worker, region = self.worker, self.worker.region
        counters = {
            name: CounterMetricFamily(name, f"Attempts this worker finished {outcome}", labels=["type", "region"])
            for outcome, name in OUTCOME_COUNTERS.items()
        }
        totals: dict[tuple[str, str], int] = {}
        for task_type, outcomes in list(worker.outcomes.items()):
            label = self.types(task_type)
            for outcome, count in list(outcomes.items()):
                if outcome in OUTCOME_COUNTERS:
                    totals[(OUTCOME_COUNTERS[outcome], label)] = totals.get((OUTCOME_COUNTERS[outcome], label), 0) + count
        for (name, label), count in sorted(totals.items()):
            counters[name].add_metric([label, region], count)
        # Cancellations are counted by the worker without their type.
        counters["tasks_cancelled"].add_metric(["", region], worker.counts.get("cancelled", 0))
        yield from counters.values()
        yield histogram(
            "task_duration_seconds",
            "Handler run time of the tasks this worker ran to success",
            ["type", "region"],
            [((self.types(task_type), region), buckets) for task_type, buckets in sorted(worker.durations.items())],
        )
        running, waiting = worker.load()
        yield _gauge("worker_tasks_running", "Tasks in this worker's handlers now", running)
        yield _gauge("worker_tasks_waiting", "Tasks this worker holds waiting for a free slot", waiting)
        yield _gauge("worker_outcomes_on_their_way", "Outcomes being recorded and acked", worker.finishing)


class MasterCollector(Collector):
    """A master's submissions handled, accepted (routed on the plain path) and rejected."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("master_submissions", "Submissions this master routed or rejected", labels=["outcome"])
        family.add_metric(["accepted"], self.master.accepted)
        family.add_metric(["rejected"], self.master.rejected)
        yield family
        yield _gauge("role_messages_held", "Upstream messages this role holds un-acked", self.master.puller.held)


class RegionalCollector(Collector):
    """A regional scheduler's tasks released onto WORK."""

    def __init__(self, regional: Regional) -> None:
        self.regional = regional

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("regional_released", "Tasks this regional scheduler released onto WORK", labels=["region"])
        family.add_metric([self.regional.region], self.regional.released)
        yield family
        yield _gauge("role_messages_held", "Upstream messages this role holds un-acked", self.regional.puller.held)


class ProjectorCollector(Collector):
    """The projector's event messages folded into KV ``tasks`` and the events it skipped."""

    def __init__(self, projector: Projector) -> None:
        self.projector = projector

    def collect(self) -> Iterator[Metric]:
        applied = CounterMetricFamily("projector_applied", "EVENTS messages this projector folded into KV tasks and acked")
        applied.add_metric([], self.projector.applied)
        yield applied
        skipped = CounterMetricFamily("projector_skipped_events", "Events it skipped (undecodable, or of an unknown schema version)")
        skipped.add_metric([], self.projector.stats.skipped)
        yield skipped
        yield _gauge("role_messages_held", "Upstream messages this role holds un-acked", self.projector.puller.held)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def collector_of(role: Any, types: TypeLabels) -> Collector | None:
    """The collector of a role object (None for a kind without one)."""
    from .master import Master
    from .projector import Projector
    from .regional import Regional
    from .worker import Worker

    if isinstance(role, Worker):
        return WorkerCollector(role, types)
    if isinstance(role, Master):
        return MasterCollector(role)
    if isinstance(role, Regional):
        return RegionalCollector(role)
    if isinstance(role, Projector):
        return ProjectorCollector(role)
    return None


def process_registry(roles: Sequence[Any], max_types: int) -> CollectorRegistry:
    """A registry of the process (CPU, memory, file descriptors, Python) and of ``roles``."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    register_roles(registry, roles, max_types)
    return registry


def register_roles(registry: CollectorRegistry, roles: Sequence[Any], max_types: int) -> None:
    """Add the collectors of ``roles`` to ``registry`` (which may already be served)."""
    types = TypeLabels(max_types)
    for role in roles:
        collector = collector_of(role, types)
        if collector is not None:
            registry.register(collector)


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(registry: CollectorRegistry, port: int, host: str, health: Health | None = None) -> WSGIServer | None:
    """Serve ``/metrics`` of ``registry`` on ``host:port`` (and, given ``health``, ``/health``
    and ``/ready``: see :mod:`streamsched.roles.health`), on a daemon thread of its own; returns
    the server (``shutdown()`` stops it). When the port cannot be had (taken), an error is
    logged and the role runs on without it, and None is returned: a watcher's endpoint must
    not stop the work it watches."""
    app = make_wsgi_app(registry)
    if health is not None:
        app = with_probes(app, health)
    try:
        server = make_server(host, port, app, _server_class(host), handler_class=_QuietHandler)
    except OSError as exc:
        log.error("cannot serve this process's metrics on %s:%d (%s); running without them", host, port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True).start()
    log.info("metrics of this process on http://%s:%d/metrics%s", host, port, " (and /health, /ready)" if health is not None else "")
    return server


def _server_class(host: str) -> type[WSGIServer]:
    """prometheus-client's threading server, for an IPv6 address too (``::``, ``::1``)."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    return Server
