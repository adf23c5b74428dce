"""Settings, read once (defaults ← environment ← explicit overrides) and passed down.

Environment variables are ``STREAMSCHED_<FIELD>`` (upper case), plus ``NATS_URL``.
An unknown ``STREAMSCHED_*`` variable is an error, not silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import ConfigError
from .model import LIMIT_KEY_RE, LIMIT_KEY_RULE, MAX_CONCURRENCY_LIMIT, PRIORITIES, REGION_FAILOVER

ENV_PREFIX = "STREAMSCHED_"
#: A switch of the process, not a setting: which per-message path each NATS connection
#: takes, ``fast`` (the default) or ``nats-py`` (see :mod:`streamsched.transport.wire`,
#: which reads it; the transport sits below the settings). Allowed beside the settings.
WIRE_ROUTE_ENV = "STREAMSCHED_WIRE"
#: The log format of role commands that are given no ``--log-format`` (the ``log_format`` setting).
LOG_FORMAT_ENV = "STREAMSCHED_LOG_FORMAT"
#: Its values: streamsched's own per-message path, or nats-py's public API.
WIRE_ROUTES = ("fast", "nats-py")
#: The ``projector_partitions`` setting's variable, which ``up --projectors`` sets for every role.
PARTITIONS_ENV = f"{ENV_PREFIX}PROJECTOR_PARTITIONS"
#: Handlers a worker runs at once unless told otherwise (``--concurrency``; a worker's own
#: option, not a deployment setting). As Temporal's and Hatchet's workers: handlers mostly
#: wait on I/O, async ones on the loop, sync ones in threads made only as calls need them.
#: Lower it for CPU-bound sync handlers.
DEFAULT_CONCURRENCY = 100
#: Tasks a worker holds waiting for a slot, per slot, unless told otherwise (``--prefetch``).
#: Without them a worker of short tasks idles a pull request's round trip whenever its
#: slots empty (docs/BENCHMARKS.md has the measurement).
PREFETCH_PER_SLOT = 1
#: Most projector partitions: each is a durable on EVENTS and a projector process or more.
MAX_PROJECTOR_PARTITIONS = 64
GIB = 1024**3


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Deployment settings shared by every role."""

    nats_url: str = "nats://127.0.0.1:4222"
    """Where the roles connect. Comma-separated for a cluster."""
    regions: tuple[str, ...] = ("default",)
    """Regions the master may route to; each needs a regional scheduler and workers."""
    priorities: tuple[str, ...] = PRIORITIES
    """Priority levels, highest first."""
    max_payload_bytes: int = 256 * 1024
    """Largest accepted submission (whole envelope, bytes); larger ones are rejected."""
    duplicate_window_s: float = 120.0
    """JetStream dedupe window: the same task id submitted twice within it runs once."""
    master_window: int = 2000
    """Submissions a master holds un-acked at once (its consumer's ``max_ack_pending``)."""
    regional_window: int = 2000
    """Tasks a regional scheduler holds un-acked at once, across its priorities (its SCHED
    consumers' ``max_ack_pending`` is this in messages of up to ``streams.SCHED_BATCH_MAX_TASKS``)."""
    work_max_ack_pending: int = 20_000
    """Cap on un-acked WORK messages per region, priority and task type across all workers."""
    worker_finish_window: int = 512
    """Outcomes a worker may have on their way at once (events being recorded, acks being
    sent) besides its running and waiting tasks. A handler's slot is free when it returns;
    past this many unsettled outcomes the worker fetches nothing more until one lands. A
    worker holds at most ``concurrency + prefetch`` plus this many un-acked messages, within
    ``work_max_ack_pending``."""
    worker_heartbeat_s: float = 2.0
    """How often a worker puts its entry (id, region, handler types, load) in KV ``workers``,
    and a regional scheduler its own (its region's backlog and worker capacity) in KV
    ``regions``. Entries expire after three heartbeats, so a worker or scheduler that
    vanished (SIGKILL, lost host) leaves ``workers list`` / ``regions list``, and the
    master stops routing to a region left without either, within that; the buckets' TTL
    follows this setting (``streams apply`` updates it). At least 0.1 s."""
    region_failover: str = "wait"
    """What a task pinned to a region (``region``) does when that region has no live
    regional scheduler or worker, unless it says itself (its ``region_failover``): ``wait``
    there (it is queued in the region all the same, and its state says why it waits), or
    go to ``any`` healthy region instead."""
    ack_wait_s: float = 30.0
    """A worker that stops heartbeating for this long loses its task to another worker."""
    max_deliver: int = 100
    """Deliveries of one WORK message at most: a safety net against tasks that crash their
    worker before it can count the attempt. ``max_attempts`` may not exceed it."""
    default_max_attempts: int = 3
    """Attempts for tasks whose envelope and handler do not say."""
    retry_base_s: float = 1.0
    """First retry delay; doubles with every attempt (with jitter)."""
    retry_max_s: float = 300.0
    """Longest retry delay."""
    grace_s: float = 30.0
    """On SIGTERM, how long running tasks may take to finish before they are nak'ed."""
    tasks_max_age_s: float = 7 * 24 * 3600.0
    """How long TASKS keeps submissions (for replay)."""
    tasks_max_bytes: int = 2 * GIB
    """Disk limit of TASKS; when full, new submissions are refused (discard new). TASKS keeps
    every submission for ``tasks_max_age_s`` whether or not it has run, so this bounds what
    may be submitted within that time, not only what waits."""
    aging_s: float = 0.0
    """Priority aging: a task queued on WORK rises one priority level each time it has waited
    this long (its ``reprioritized`` events say so), so a steady flood of higher tasks delays
    it by a bounded time. 0 (the default): off."""
    breaker_failures_in_row: int = 0
    """Circuit breakers: a task type's breaker in a region opens after this many failed
    attempts (``retrying``, ``failed``, ``dead``) with no success between them, as the
    masters see them in the workers' heartbeats. While open, nothing of that type is
    delivered there (its tasks wait on WORK); other types keep flowing. 0 (the default): off."""
    breaker_failure_rate: float = 0.0
    """Circuit breakers: a breaker also opens when this share (0 to 1) of the attempts of its
    type and region that finished within ``breaker_window_s`` failed, once at least
    ``breaker_min_tasks`` finished there. 0 (the default): off."""
    breaker_min_tasks: int = 20
    """Finished attempts ``breaker_failure_rate`` needs in its window before it may open a breaker."""
    breaker_window_s: float = 60.0
    """The window ``breaker_failure_rate`` is measured over (seconds)."""
    breaker_cooldown_s: float = 30.0
    """How long an open breaker holds its type back before it half-opens and lets probes through.
    Keep it several ``worker_heartbeat_s``: the masters hear of outcomes one heartbeat late."""
    breaker_probes: int = 1
    """Tasks of a half-open breaker's type delivered at once per priority (the WORK durables'
    ``max_ack_pending`` while half-open). A success closes the breaker, a failure opens it again."""
    concurrency_limits: dict[str, int] = {}
    """Limits of concurrency keys by key: at most this many tasks with the task field
    ``concurrency_key`` set to the key are admitted onto WORK and unfinished at once, across
    every regional scheduler and worker (a task may give its own ``concurrency_limit``).
    From the environment as ``key=limit,key=limit``."""
    rate_limits: dict[str, float] = {}
    """Rate limits, in tasks per second, by task type or by the name a task gives as its
    ``rate_key``: tasks are admitted onto WORK no faster than this, across the cluster (a
    token bucket holding a tenth of a second's worth). From the environment as ``name=rate,...``."""
    fairness_weights: dict[str, float] = {}
    """Shares of fairness keys (the task field ``fairness_key``, e.g. a tenant), default 1: the
    tasks of each key queued for one type in one region are admitted in proportion to them."""
    fairness_window: int = 256
    """Tasks with a fairness key that may wait undelivered on one WORK subject (region,
    priority and type) at once; the rest wait in their keys' lanes, where the shares apply.
    A task of a quiet key waits behind about this many tasks at most."""
    api_token: str = ""
    """Bearer token the REST API requires (``Authorization: Bearer <token>``) on every path
    but ``/health``; empty (the default): none, and the API listens on loopback only."""
    api_index_max_tasks: int = 1_000_000
    """Tasks the API process keeps in its task list (a view of KV ``tasks``, about 1 KB each);
    past it, the oldest submissions leave the list (they stay readable by id)."""
    metrics_port: int = 0
    """Port of a role process's own Prometheus ``/metrics`` (each role command's
    ``--metrics-port`` overrides it; ``up --metrics-port-base`` gives each of its processes
    one). 0 (the default): none. The cluster-wide view is the API's ``/metrics``."""
    metrics_host: str = "127.0.0.1"
    """Address a role's ``/metrics`` listens on (it has no authentication: loopback unless set)."""
    metrics_max_types: int = 100
    """Distinct task types a metric labels by name; types first seen past it are labelled
    ``other``, so made-up types cannot grow the series without bound."""
    metrics_max_tasks: int = 100_000
    """Tasks the API's ``/metrics`` follows at once to time their waits, hops and runs
    (about 250 bytes each, plus as many ids of tasks that finished lately, about 120 bytes
    each); past it the oldest unfinished one is dropped (its counts stay exact, its later
    timings are not observed)."""
    submit_retry_budget_s: float = 5.0
    """How long the client keeps trying a publish that a full stream refused (submissions,
    cancel requests, schedules), with exponential backoff and jitter, before it raises
    :class:`~streamsched.errors.Overloaded` naming the limit. 0: raise at the first refusal."""
    queue_max_bytes: int = 2 * GIB
    """Disk limit of SCHED and of WORK each; when full, publishers are refused and retry."""
    events_max_age_s: float = 7 * 24 * 3600.0
    """How long EVENTS (and the task states folded from it) are kept."""
    dependency_timeout_s: float = 24 * 3600.0
    """Longest a task waits for its dependencies (``depends_on``) unless it says otherwise;
    past it the task is cancelled. At most ``events_max_age_s`` (the waiting records expire then)."""
    max_split_chunks: int = 1000
    """Most chunks one ``split`` task may fan out into."""
    events_max_bytes: int = 4 * GIB
    """Disk limit of EVENTS; when full, the oldest events go first."""
    dlq_max_age_s: float = 30 * 24 * 3600.0
    """How long dead tasks stay in DLQ."""
    dlq_max_bytes: int = 1 * GIB
    """Disk limit of DLQ; when full, the oldest entries go first."""
    state_max_bytes: int = 1 * GIB
    """Disk limit of KV ``tasks``."""
    cancel_ttl_s: float = 24 * 3600.0
    """How long a cancellation is remembered (KV ``cancels``): a cancelled task that is still
    queued after this long (no worker for its region) may run after all."""
    idempotency_ttl_s: float = 24 * 3600.0
    """How long an ``idempotency_key`` names its first task (from when it was taken); whole
    seconds, at least 1 (nats-server's per-message TTL)."""
    replicas: int = 1
    """Stream replicas: 1 on a laptop, 3 on a cluster."""
    event_loop: str = "uvloop"
    """The roles' event loop: ``uvloop`` (libuv's, in C; the default where it is installed,
    which pip does everywhere but Windows) or ``asyncio`` (the standard library's). uvloop
    gives 9 % more tasks/s in ``bench throughput``."""
    projector_partitions: int = 1
    """Projector partitions: each task's events go to one of them, chosen by a hash of its id,
    and each has its own durable on EVENTS read by the projectors started with its
    ``--partition``. 1: one durable on every event. Every role must have the same value (the
    recorders publish to the partitions, ``streams apply`` makes their durables); ``up`` and
    ``bench --projectors N`` set it to N."""
    projector_nice: int = 10
    """How far the projector lowers its own CPU priority (a ``nice`` increment, 0 to 19).
    Its work can wait and the tasks' cannot: when roles share cores, the pipeline goes first
    and the state view catches up after a burst. 0 keeps it level with the other roles."""
    log_format: str = "text"
    """How roles log: ``text`` (readable lines) or ``json`` (one object a line, with the task's
    id, type, attempt and trace id on a task's lines). ``--log-format`` overrides it."""
    autoscale_tick_s: float = 2.0
    """How often ``up --autoscale`` samples its regions' WORK consumers (one consumer
    listing per sample) and decides the worker count."""
    autoscale_up_ticks: int = 2
    """Consecutive busy samples before ``up --autoscale`` adds workers: a busy sample has
    more tasks queued and held (``num_pending + num_ack_pending`` of the region's WORK
    durables) than ``autoscale_busy_load`` times the slots (workers x concurrency)."""
    autoscale_busy_load: float = 1.0
    """Tasks per handler slot above which a sample is busy: at 1.0, as soon as some task
    waits for a slot."""
    autoscale_up_step: int = 2
    """Workers added at most per decision (as many as the queued and held tasks fill, up to this)."""
    autoscale_idle_load: float = 0.5
    """A sample is idle when no task is queued and the tasks held would fill at most this
    share of the slots left after one worker fewer. Below ``autoscale_busy_load``, so that a
    count just changed is not changed back by the same load."""
    autoscale_idle_s: float = 30.0
    """Seconds of idle samples only before ``up --autoscale`` drains one worker (and again
    as long before the next)."""

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from defaults, then the environment, then ``overrides``.

        Overrides whose value is ``None`` are skipped, so CLI options can pass through.
        """
        env = os.environ if env is None else env
        fields = set(cls.__struct_fields__)
        raw: dict[str, Any] = {}
        if "NATS_URL" in env:
            raw["nats_url"] = env["NATS_URL"]
        for key, value in env.items():
            if key == WIRE_ROUTE_ENV and value not in WIRE_ROUTES:
                raise ConfigError(f"{WIRE_ROUTE_ENV} must be one of {', '.join(WIRE_ROUTES)}, not {value!r}")
            if not key.startswith(ENV_PREFIX) or key == WIRE_ROUTE_ENV:
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                raise ConfigError(f"unknown setting {key} (known: {', '.join(sorted(fields))})")
            raw[name] = _parse_env(value, cls.__struct_defaults__[cls.__struct_fields__.index(name)])
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(str(exc)) from None
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings that cannot work, with the reason."""
        from .subjects import is_token

        for name in (*self.regions, *self.priorities):
            if not is_token(name):
                raise ConfigError(f"{name!r} is not a valid region or priority name")
        if not self.regions or not self.priorities:
            raise ConfigError("at least one region and one priority are needed")
        if self.master_window < 1 or self.regional_window < 1 or self.worker_finish_window < 1:
            raise ConfigError("windows must be at least 1")
        if self.event_loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"event_loop must be uvloop or asyncio, not {self.event_loop!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, not {self.log_format!r}")
        if self.idempotency_ttl_s < 1:
            raise ConfigError(f"idempotency_ttl_s must be at least 1 (second), not {self.idempotency_ttl_s}")
        if not self.worker_heartbeat_s >= 0.1:  # also refuses NaN; three of them are the bucket's TTL, which the server wants >= 100 ms
            raise ConfigError(f"worker_heartbeat_s must be at least 0.1 (seconds), not {self.worker_heartbeat_s}")
        if not (self.aging_s == 0 or self.aging_s >= 0.1):  # also refuses NaN
            raise ConfigError(f"aging_s must be 0 (off) or at least 0.1 (seconds), not {self.aging_s}")
        self._check_breakers()
        if not self.submit_retry_budget_s >= 0:  # also refuses NaN
            raise ConfigError(f"submit_retry_budget_s must be at least 0 (seconds), not {self.submit_retry_budget_s}")
        if self.region_failover not in REGION_FAILOVER:
            raise ConfigError(f"region_failover must be one of {', '.join(REGION_FAILOVER)}, not {self.region_failover!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0 (none) to 65535, not {self.metrics_port}")
        if self.metrics_max_types < 1 or self.metrics_max_tasks < 1:
            raise ConfigError("metrics_max_types and metrics_max_tasks must be at least 1")
        if not 1 <= self.projector_partitions <= MAX_PROJECTOR_PARTITIONS:
            raise ConfigError(f"projector_partitions must be 1 to {MAX_PROJECTOR_PARTITIONS}, not {self.projector_partitions}")
        if not 0 <= self.projector_nice <= 19:
            raise ConfigError(f"projector_nice must be 0 to 19, not {self.projector_nice}")
        self._check_autoscale()
        self._check_limits()

    def _check_limits(self) -> None:
        mappings: dict[str, Mapping[str, float]] = {
            "concurrency_limits": self.concurrency_limits,
            "rate_limits": self.rate_limits,
            "fairness_weights": self.fairness_weights,
        }
        for setting, mapping in mappings.items():
            for name, number in mapping.items():
                if not LIMIT_KEY_RE.fullmatch(name):
                    raise ConfigError(f"{setting}: {name!r} is not a valid key ({LIMIT_KEY_RULE})")
                if not number > 0:  # also refuses NaN
                    raise ConfigError(f"{setting}: the value of {name!r} must be above 0, not {number}")
        if any(limit > MAX_CONCURRENCY_LIMIT for limit in self.concurrency_limits.values()):
            raise ConfigError(f"concurrency_limits: a limit may be {MAX_CONCURRENCY_LIMIT} at most")
        if not 1 <= self.fairness_window <= 1_000_000:
            raise ConfigError(f"fairness_window must be 1 to 1,000,000, not {self.fairness_window}")

    def _check_breakers(self) -> None:
        if self.breaker_failures_in_row < 0:
            raise ConfigError(f"breaker_failures_in_row must be at least 0 (0: off), not {self.breaker_failures_in_row}")
        if not 0 <= self.breaker_failure_rate <= 1:  # also refuses NaN
            raise ConfigError(f"breaker_failure_rate must be 0 (off) to 1, not {self.breaker_failure_rate}")
        if self.breaker_min_tasks < 1 or self.breaker_probes < 1:
            raise ConfigError("breaker_min_tasks and breaker_probes must be at least 1")
        if not (self.breaker_window_s > 0 and self.breaker_cooldown_s > 0):  # also refuses NaN
            raise ConfigError("breaker_window_s and breaker_cooldown_s must be above 0 (seconds)")

    def _check_autoscale(self) -> None:
        if not self.autoscale_tick_s >= 0.1:  # also refuses NaN
            raise ConfigError(f"autoscale_tick_s must be at least 0.1 (seconds), not {self.autoscale_tick_s}")
        if self.autoscale_up_ticks < 1 or self.autoscale_up_step < 1:
            raise ConfigError("autoscale_up_ticks and autoscale_up_step must be at least 1")
        if not 0 <= self.autoscale_idle_load < self.autoscale_busy_load:
            raise ConfigError(
                "autoscale_idle_load must be at least 0 and below autoscale_busy_load "
                f"(not {self.autoscale_idle_load} and {self.autoscale_busy_load}): the gap keeps the count from flapping"
            )
        if not self.autoscale_idle_s >= 0:
            raise ConfigError(f"autoscale_idle_s must be at least 0, not {self.autoscale_idle_s}")


def _parse_env(value: str, default: Any) -> Any:
    """Tuple settings are comma-separated, mappings ``name=value`` pairs so; everything else
    is left for msgspec to convert."""
    if isinstance(default, tuple):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(default, dict) or getattr(default, "factory", None) is dict:  # msgspec keeps ``{}`` as a factory
        pairs = (item.partition("=") for item in value.split(",") if item.strip())
        return {name.strip(): number.strip() for name, _, number in pairs}
    return value
