"""Streams, consumers and the KV bucket, declared from :class:`Settings` and applied idempotently.

Retention follows the role of each stream:

* TASKS (limits, discard new): every submission, every rejection and every cancel
  request, kept ``tasks_max_age_s`` for replay and inspection; at ``tasks_max_bytes`` it
  refuses new ones (see :mod:`streamsched.transport.overload`). Submissions arrive on ``tasks.submit`` (priority in the body)
  or on ``tasks.submit.<priority>`` for each configured priority, and only those: a
  publish to another priority's subject is refused (no stream takes it) rather than
  stored where no master reads it. ``apply`` adds the subjects of new priorities to an
  existing TASKS in place.
* SCHED, WORK (work queue): a task sits here until the next hop acks it. ``discard new``
  so a full stream refuses publishers with an error instead of dropping old work. SCHED
  allows atomic batches: a batch submission's tasks land all together.
* FINISHED (work queue): the projector's notices of the tasks it wrote final, for the
  masters that release what waits for them.
* TIMERS (work queue): message schedules (delayed tasks on ``timers.at.<id>``), which
  nats-server fires onto ``timers.due`` for the master.
* EVENTS (limits): the lifecycle log, the source of truth (``events.<source>``, each
  message holding the events of many tasks).
* DLQ (limits): dead tasks with their last error.
* KV ``tasks``: the latest state of each task, a projection of EVENTS.
* KV ``cancels``: the ids of cancelled tasks, each for ``cancel_ttl_s``.
* KV ``waiting``, ``dependants``, ``workflows``: tasks waiting for dependencies, the
  dependency edges, workflow states (see :mod:`streamsched.roles.dependencies`).
* KV ``priorities``: priority overrides of queued tasks (see :mod:`streamsched.roles.reprioritize`).
* KV ``schedules``: cron schedule definitions; KV ``idempotency``: idempotency keys, each
  with its own TTL.
* KV ``workers``: the live workers, each entry put again every ``worker_heartbeat_s`` and
  expiring three heartbeats after its last put (see :mod:`streamsched.roles.worker_registry`).
* KV ``regions``: the live regional schedulers with their regions' headroom, kept the same
  way (see :mod:`streamsched.roles.region_registry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from .. import subjects
from ..config import Settings
from .answering import NOT_ANSWERING
from .bus import Bus

#: Event messages the projector holds un-acked (its consumer's ``max_ack_pending``). This
#: bounds the projector's memory when it falls behind: a message holds the events one role
#: handled in one loop tick, up to ``recorder.MAX_EVENTS`` (128) under load, and a held
#: event takes about 0.37 KB decoded, so 500 messages are some 24 MB at most. A larger
#: window saves KV writes (more of a task's events arrive before its state is written)
#: but costs memory in proportion: with full messages 2,000 peaked at 209 MB in
#: ``bench backlog``, 500 peak at 131-139 MB, under the 150 MB a role may take.
PROJECTOR_WINDOW = 500
#: Cancel requests a master's canceller works on at once.
CANCELLER_WINDOW = 64
#: Notices of finished tasks a master resolves at once (each names up to a projector batch).
RESOLVER_WINDOW = 16
#: Dependency timeouts that fired a master handles at once.
DEPS_TIMEOUT_WINDOW = 64
#: What TIMERS fired that the masters hold un-acked at once (their ``master-timers`` consumer).
TIMERS_WINDOW = 256
#: Tasks in one SCHED batch at most: a regional scheduler's window (``regional_window``
#: tasks) is this many times fewer messages.
SCHED_BATCH_MAX_TASKS = 64


def sched_window_messages(window_tasks: int, levels: int) -> int:
    """Un-acked SCHED messages that hold at most ``window_tasks`` tasks (at least one per level)."""
    return max(levels, window_tasks // SCHED_BATCH_MAX_TASKS)


#: Streams whose subjects are few (per region and priority), so a count per subject is useful.
DEPTH_BY_SUBJECT = (subjects.TASKS_STREAM, subjects.SCHED_STREAM, subjects.WORK_STREAM)


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """Every stream streamsched needs (the KV bucket's stream is created by nats-py)."""
    own = [
        StreamConfig(
            name=subjects.TASKS_STREAM,
            subjects=[subjects.SUBMIT, *map(subjects.submit, settings.priorities), subjects.REJECTED, subjects.CANCEL, subjects.REPRIORITIZE],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.NEW,
            max_age=settings.tasks_max_age_s,
            max_bytes=settings.tasks_max_bytes,
            max_msg_size=settings.max_payload_bytes * 4,
        ),
        StreamConfig(
            name=subjects.SCHED_STREAM,
            subjects=["sched.*.*", subjects.HELD_ALL],  # lanes: tasks parked by their limits
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
            max_bytes=settings.queue_max_bytes,
            allow_atomic=True,  # a batch submission's tasks are stored all together or not at all
        ),
        StreamConfig(
            name=subjects.FINISHED_STREAM,
            subjects=[subjects.FINISHED],
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
            max_bytes=settings.queue_max_bytes,
        ),
        StreamConfig(
            name=subjects.TIMERS_STREAM,
            # Message schedules, fired by the server onto timers.due (a schedule's target
            # must be in its own stream). nats-server refuses schedules in a stream that
            # discards new messages, and one that discards old ones at a limit would drop
            # waiting tasks: so no limit, and the stream holds only what has yet to fire.
            subjects=[subjects.TIMERS_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.OLD,
            allow_msg_schedules=True,
            allow_rollup_hdrs=True,  # the server turns it on for schedules; declared so apply sees no change
            allow_msg_ttl=True,  # a schedule is removed by an empty message that rolls it up and expires
        ),
        StreamConfig(
            name=subjects.WORK_STREAM,
            subjects=[subjects.WORK_ALL],
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
            max_bytes=settings.queue_max_bytes,
        ),
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            subjects=[subjects.EVENTS_ALL],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=settings.events_max_age_s,
            max_bytes=settings.events_max_bytes,
        ),
        StreamConfig(
            name=subjects.DLQ_STREAM,
            subjects=["dlq.*"],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=settings.dlq_max_age_s,
            max_bytes=settings.dlq_max_bytes,
        ),
    ]
    return [_with_shared_settings(config, settings) for config in own]


#: The setting behind each limit at which a stream refuses publishes (discard new), so that
#: :class:`~streamsched.errors.Overloaded` can name it. EVENTS and DLQ discard their oldest
#: messages at their limits instead, and TIMERS has none.
LIMIT_SETTINGS: dict[tuple[str, str], str] = {
    (subjects.TASKS_STREAM, "max_bytes"): "tasks_max_bytes",
    (subjects.SCHED_STREAM, "max_bytes"): "queue_max_bytes",
    (subjects.FINISHED_STREAM, "max_bytes"): "queue_max_bytes",
    (subjects.WORK_STREAM, "max_bytes"): "queue_max_bytes",
    (f"KV_{subjects.STATE_BUCKET}", "max_bytes"): "state_max_bytes",
}


def _with_shared_settings(config: StreamConfig, settings: Settings) -> StreamConfig:
    """``config`` with what every stream shares: file storage, the replicas, direct gets and the dedup window."""
    return replace(
        config,
        storage=StorageType.FILE,
        num_replicas=settings.replicas,
        allow_direct=True,
        duplicate_window=settings.duplicate_window_s,
    )


#: Seconds a KV ``cancels``, ``workers`` or ``regions`` expiry leaves its marker (the minimum):
#: the marker is what tells the roles' watches to forget the id, the worker or the scheduler.
EXPIRY_MARKER_TTL_S = 1.0
#: A worker's entry in KV ``workers`` (and a regional scheduler's in ``regions``) expires
#: this many heartbeats after its last put.
WORKER_HEARTBEATS_TO_LIVE = 3


def kv_config(settings: Settings) -> KeyValueConfig:
    """The ``tasks`` bucket: one revision per task, expiring with the events it folds."""
    return KeyValueConfig(
        bucket=subjects.STATE_BUCKET,
        history=1,
        ttl=settings.events_max_age_s,
        storage=StorageType.FILE,
        replicas=settings.replicas,
        max_bytes=settings.state_max_bytes,
        direct=True,
    )


def kv_configs(settings: Settings) -> list[KeyValueConfig]:
    """Every bucket: ``tasks``, then the dependency, workflow and priority-override buckets (these expire with
    the events too, from their last write, so a dependency timeout may not be longer), then
    the cancelled ids (kept ``cancel_ttl_s``), the cron schedules, the idempotency keys
    (each key with its own TTL, which nats-py's bucket streams allow), the live workers and
    the live regional schedulers (kept three heartbeats). The circuit breakers and the
    limits' slots and token buckets are kept with the schedules: they outlive the processes
    that set them."""
    own = [
        KeyValueConfig(
            bucket=bucket,
            history=1,
            ttl=settings.events_max_age_s,
            storage=StorageType.FILE,
            replicas=settings.replicas,
            direct=True,
        )
        for bucket in (subjects.WAITING_BUCKET, subjects.DEPENDANTS_BUCKET, subjects.WORKFLOWS_BUCKET, subjects.PRIORITIES_BUCKET)
    ]
    cancels = KeyValueConfig(
        bucket=subjects.CANCELS_BUCKET,
        history=1,
        ttl=settings.cancel_ttl_s,
        storage=StorageType.FILE,
        replicas=settings.replicas,
        direct=True,
        limit_marker_ttl=EXPIRY_MARKER_TTL_S,
    )
    # A few live entries each, rewritten every heartbeat: nothing to keep across a restart.
    workers, regions = (
        KeyValueConfig(
            bucket=bucket,
            history=1,
            ttl=WORKER_HEARTBEATS_TO_LIVE * settings.worker_heartbeat_s,
            storage=StorageType.MEMORY,
            replicas=settings.replicas,
            direct=True,
            limit_marker_ttl=EXPIRY_MARKER_TTL_S,
        )
        for bucket in (subjects.WORKERS_BUCKET, subjects.REGIONS_BUCKET)
    )
    schedules_and_keys = [
        KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, replicas=settings.replicas, direct=True)
        for bucket in (subjects.SCHEDULES_BUCKET, subjects.IDEMPOTENCY_BUCKET, subjects.BREAKERS_BUCKET, subjects.LIMITS_BUCKET)
    ]
    return [kv_config(settings), *own, cancels, *schedules_and_keys, workers, regions]


def _role_consumer(name: str, filter_subject: str, window: int, **more: Any) -> ConsumerConfig:
    """A durable of a role that never fails on bad input, only on outages: it retries without limit."""
    return ConsumerConfig(
        durable_name=name,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_ack_pending=window,
        max_deliver=-1,
        **more,
    )


def ingress_consumers(settings: Settings) -> list[tuple[str, str]]:
    """``(durable, filter)`` of the masters' consumers on TASKS: ``master`` on plain
    ``tasks.submit`` (its name kept, so a deployment keeps its place there), then
    ``master-<priority>`` on each ``tasks.submit.<priority>``, highest first."""
    return [(subjects.MASTER_CONSUMER, subjects.SUBMIT), *((subjects.master_consumer(p), subjects.submit(p)) for p in settings.priorities)]


def consumer_configs(settings: Settings) -> list[tuple[str, ConsumerConfig]]:
    """``(stream, config)`` of every durable pull consumer."""
    out: list[tuple[str, ConsumerConfig]] = [
        *(
            (subjects.TASKS_STREAM, _role_consumer(name, subject, settings.master_window, max_waiting=512))
            for name, subject in ingress_consumers(settings)
        ),
        (subjects.TASKS_STREAM, _role_consumer(subjects.CANCELLER_CONSUMER, subjects.CANCEL, CANCELLER_WINDOW)),
        # One request at a time across every master: a move pauses a WORK durable and must not overlap another.
        (subjects.TASKS_STREAM, _role_consumer(subjects.REPRIORITIZER_CONSUMER, subjects.REPRIORITIZE, 1)),
        (subjects.FINISHED_STREAM, _role_consumer(subjects.RESOLVER_CONSUMER, subjects.FINISHED, RESOLVER_WINDOW)),
        (subjects.TIMERS_STREAM, _role_consumer(subjects.TIMERS_CONSUMER, subjects.TIMERS_DUE, TIMERS_WINDOW)),
        (subjects.TIMERS_STREAM, _role_consumer(subjects.DEPS_TIMEOUT_CONSUMER, subjects.DEPS_DUE, DEPS_TIMEOUT_WINDOW)),
        (subjects.EVENTS_STREAM, _role_consumer(subjects.PROJECTOR_CONSUMER, subjects.EVENTS_ALL, PROJECTOR_WINDOW)),
    ]
    for region in settings.regions:
        for priority in settings.priorities:
            window = sched_window_messages(settings.regional_window, len(settings.priorities))
            out.append((subjects.SCHED_STREAM, _role_consumer(subjects.sched_consumer(region, priority), subjects.sched(region, priority), window)))
    return out


def work_consumer_config(settings: Settings, region: str, priority: str, task_type: str) -> ConsumerConfig:
    """The durable on WORK of one region, priority and task type. Workers create it for the
    types they load (:func:`ensure_work_consumers`): the types are known only to them."""
    return ConsumerConfig(
        durable_name=subjects.work_consumer(region, priority, task_type),
        filter_subject=subjects.work(region, priority, task_type),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_ack_pending=settings.work_max_ack_pending,
        max_deliver=settings.max_deliver,
    )


async def _work_consumer_configs(bus: Bus, settings: Settings) -> list[tuple[str, ConsumerConfig]]:
    """The configs, from ``settings``, of the WORK durables workers have made (``apply`` brings
    them up to date: a changed ``ack_wait_s`` reaches them without restarting every worker)."""
    existing: list[Any] = []
    try:
        while page := await bus.js.consumers_info(subjects.WORK_STREAM, offset=len(existing)):
            existing += page
    except NotFoundError:
        return []
    out: list[tuple[str, ConsumerConfig]] = []
    for info in existing:
        parsed = subjects.parse_work(info.config.filter_subject or "")
        if parsed is None:
            continue
        region, priority, task_type = parsed
        if region in settings.regions and priority in settings.priorities and info.name == subjects.work_consumer(region, priority, task_type):
            out.append((subjects.WORK_STREAM, work_consumer_config(settings, region, priority, task_type)))
    return out


async def ensure_work_consumers(bus: Bus, settings: Settings, region: str, task_types: Sequence[str]) -> list[str]:
    """Create (or bring up to date) the WORK durables of ``task_types`` in ``region``, every
    priority; their names, highest priority first and the types in the order given."""
    names: list[str] = []
    for priority in settings.priorities:
        for task_type in task_types:
            config = work_consumer_config(settings, region, priority, task_type)
            await bus.js.add_consumer(subjects.WORK_STREAM, config)  # creates, or updates in place
            assert config.durable_name is not None
            names.append(config.durable_name)
    return names


#: Longest a new JetStream cluster may take to elect its meta leader (a few seconds on loopback).
READY_TIMEOUT_S = 30.0


async def wait_until_ready(bus: Bus, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once JetStream answers account requests: at once on one server; a cluster
    answers 503 until its nodes have met and elected a meta leader."""
    deadline = anyio.current_time() + timeout_s
    while True:
        try:
            await bus.js.account_info()
            return
        except NOT_ANSWERING:
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.2)


async def wait_for_leaders(bus: Bus, settings: Settings, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Return once every stream and bucket has a leader: in a cluster a stream just made
    elects one within seconds, and a role started before then would time out on it."""
    names = [config.name or "" for config in stream_configs(settings)] + [f"KV_{kv.bucket}" for kv in kv_configs(settings)]
    deadline = anyio.current_time() + timeout_s
    for name in names:
        while True:
            try:
                info = await bus.js.stream_info(name)
                if info.cluster is None or info.cluster.leader:
                    break
            except NOT_ANSWERING:
                pass
            if anyio.current_time() > deadline:
                raise TimeoutError(f"stream {name} has no leader after {timeout_s:g}s")
            await anyio.sleep(0.1)


#: The dedupe window nats-py gives a bucket (or its TTL, if shorter).
KV_DUPLICATE_WINDOW_S = 120.0
#: TTLs closer than this are the same (the server keeps nanoseconds, the config float seconds).
TTL_TOLERANCE_S = 0.001


@dataclass(frozen=True)
class Change:
    """One line of what ``streams apply`` did."""

    kind: str  # "stream", "consumer" or "kv"
    name: str
    action: str  # "created", "updated" or "unchanged"
    detail: str = ""

    def __str__(self) -> str:
        tail = f" ({self.detail})" if self.detail else ""
        return f"{self.action:<9} {self.kind:<8} {self.name}{tail}"


def _differences(desired: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(key for key, value in desired.items() if current.get(key) != value)


async def apply(bus: Bus, settings: Settings) -> list[Change]:
    """Create what is missing and update what differs; safe to run on every start."""
    js = bus.js
    changes: list[Change] = []
    for config in stream_configs(settings):
        stream_name = config.name
        assert stream_name is not None
        try:
            current = (await js.stream_info(stream_name)).config
        except NotFoundError:
            await js.add_stream(config)
            changes.append(Change("stream", stream_name, "created"))
            continue
        diff = _differences(config.as_dict(), current.as_dict())
        if diff:
            await js.update_stream(config)
        changes.append(Change("stream", stream_name, "updated" if diff else "unchanged", ", ".join(diff)))

    for kv in kv_configs(settings):
        try:
            current = (await js.stream_info(f"KV_{kv.bucket}")).config
        except NotFoundError:
            await js.create_key_value(kv)
            changes.append(Change("kv", kv.bucket, "created"))
            continue
        # The TTL follows settings that may change (worker_heartbeat_s, cancel_ttl_s ...);
        # the dedupe window may not be longer, as nats-py makes it for a new bucket.
        if abs((current.max_age or 0.0) - (kv.ttl or 0.0)) > TTL_TOLERANCE_S:
            window = min(KV_DUPLICATE_WINDOW_S, kv.ttl) if kv.ttl else KV_DUPLICATE_WINDOW_S
            await js.update_stream(replace(current, max_age=kv.ttl or 0.0, duplicate_window=window))
            changes.append(Change("kv", kv.bucket, "updated", "ttl"))
        else:
            changes.append(Change("kv", kv.bucket, "unchanged"))

    for stream, consumer in [*consumer_configs(settings), *await _work_consumer_configs(bus, settings)]:
        name = consumer.durable_name
        assert name is not None
        try:
            current_consumer = (await js.consumer_info(stream, name)).config
        except NotFoundError:
            await js.add_consumer(stream, consumer)
            changes.append(Change("consumer", f"{stream}/{name}", "created"))
            continue
        diff = _differences(consumer.as_dict(), current_consumer.as_dict())
        if diff:
            # add_consumer updates an existing durable in place (the server creates or updates).
            await js.add_consumer(stream, consumer)
        changes.append(Change("consumer", f"{stream}/{name}", "updated" if diff else "unchanged", ", ".join(diff)))
    return changes


async def show(bus: Bus) -> list[str]:
    """Human-readable lines: each stream with its depth per subject, then its consumers."""
    js = bus.js
    lines: list[str] = []
    for info in await js.streams_info():
        name = info.config.name or ""
        state = info.state
        lines.append(f"{name:<12} {state.messages:>9} msgs {state.bytes:>12} bytes  subjects={info.config.subjects}")
        if name in DEPTH_BY_SUBJECT:
            detail = await js.stream_info(name, subjects_filter=">")
            for subject, count in sorted((detail.state.subjects or {}).items())[:50]:
                lines.append(f"    {subject:<40} {count:>9}")
        for consumer in await js.consumers_info(name):
            lines.append(
                f"    consumer {consumer.name:<28} pending={consumer.num_pending:<8} "
                f"ack_pending={consumer.num_ack_pending:<6} redelivered={consumer.num_redelivered}"
            )
    return lines
