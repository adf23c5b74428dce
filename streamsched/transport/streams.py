"""Streams, consumers and KV buckets: defined in files (``streamsched/streams/``, ``streams/``
in a clone; their README has the format and the reasons), filled from :class:`Settings` by
:func:`placeholders`, and applied idempotently.

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
* EVENTS (limits): the lifecycle log, the source of truth (``events.<source>``, or
  ``events.<source>.<k>`` with projector partitions, each message holding the events of
  many tasks), read by the projectors' durables: one, or one per partition.
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

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, cast

import anyio
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ReplayPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from .. import subjects
from ..config import Settings
from . import definitions
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
#: A WORK durable's definition, filled per region, priority and task type by the workers
#: (:func:`ensure_work_consumers`): the types are known only to them.
WORK_CONSUMER_FILE = "consumer/worker.json"
#: The projector's durable with one partition, and the partitions' durables with more
#: (``projector_partitions``): the files that do not apply to the settings are left out.
PROJECTOR_CONSUMER_FILE = "consumer/projector.json"
PARTITIONED_PROJECTOR_FILE = "consumer/projector-partitions.json"
#: A worker's entry in KV ``workers`` (and a regional scheduler's in ``regions``) expires
#: this many heartbeats after its last put.
WORKER_HEARTBEATS_TO_LIVE = 3
#: TASKS stores a message of up to this many times ``max_payload_bytes``: the master then
#: rejects an oversized submission with its reason, where the publisher would get a bare refusal.
TASKS_MESSAGE_PAYLOADS = 4
#: The API's enums by field, so that a config read from a file holds them as nats-py's own do.
_ENUMS: dict[str, type[Enum]] = {
    "retention": RetentionPolicy,
    "discard": DiscardPolicy,
    "storage": StorageType,
    "ack_policy": AckPolicy,
    "deliver_policy": DeliverPolicy,
    "replay_policy": ReplayPolicy,
}
#: Durations of a bucket's config: nanoseconds in its file, seconds in nats-py's KeyValueConfig.
_KV_DURATIONS = ("ttl", "limit_marker_ttl")
NANOSECONDS = 1_000_000_000
#: The dedupe window nats-py gives a bucket (or its TTL, if shorter).
KV_DUPLICATE_WINDOW_S = 120.0


def nanoseconds(seconds: float) -> int:
    """``seconds`` as the API takes a duration (converted as nats-py converts it)."""
    return int(seconds * NANOSECONDS)


def placeholders(settings: Settings) -> dict[str, Any]:
    """What each ``${name}`` in the definition files stands for (durations in nanoseconds)."""
    return {
        "replicas": settings.replicas,
        "duplicate_window_ns": nanoseconds(settings.duplicate_window_s),
        "tasks_max_age_ns": nanoseconds(settings.tasks_max_age_s),
        "tasks_max_bytes": settings.tasks_max_bytes,
        "tasks_max_msg_size": settings.max_payload_bytes * TASKS_MESSAGE_PAYLOADS,
        "queue_max_bytes": settings.queue_max_bytes,
        "events_max_age_ns": nanoseconds(settings.events_max_age_s),
        "events_max_bytes": settings.events_max_bytes,
        "dlq_max_age_ns": nanoseconds(settings.dlq_max_age_s),
        "dlq_max_bytes": settings.dlq_max_bytes,
        "state_max_bytes": settings.state_max_bytes,
        "cancel_ttl_ns": nanoseconds(settings.cancel_ttl_s),
        "heartbeat_ttl_ns": nanoseconds(WORKER_HEARTBEATS_TO_LIVE * settings.worker_heartbeat_s),
        "master_window": settings.master_window,
        "sched_window": sched_window_messages(settings.regional_window, len(settings.priorities)),
        "canceller_window": CANCELLER_WINDOW,
        "resolver_window": RESOLVER_WINDOW,
        "timers_window": TIMERS_WINDOW,
        "deps_timeout_window": DEPS_TIMEOUT_WINDOW,
        "projector_window": PROJECTOR_WINDOW,
        "ack_wait_ns": nanoseconds(settings.ack_wait_s),
        "work_max_ack_pending": settings.work_max_ack_pending,
        "max_deliver": settings.max_deliver,
    }


@dataclass(frozen=True)
class Filled:
    """The definition files with the settings filled in, in their API shapes."""

    streams: list[dict[str, Any]]
    kv: list[dict[str, Any]]
    #: ``{"stream_name": ..., "config": ...}`` each, as ``$JS.API.CONSUMER.CREATE`` takes them.
    consumers: list[dict[str, Any]]


@functools.cache
def _read(kind: str) -> list[tuple[str, Any]]:
    """The files of one kind, read once: they do not change while a process runs (callers only fill copies)."""
    return definitions.read(kind)


def filled(settings: Settings) -> Filled:
    """Every stream, bucket and role durable (not the workers' WORK durables), filled from ``settings``."""
    values = placeholders(settings)
    partitions = settings.projector_partitions
    # Partition 0's durable has an item of its own (it also reads unpartitioned events): the others repeat.
    repeated = {"region": settings.regions, "priority": settings.priorities, "partition": [str(k) for k in range(1, partitions)]}
    unused = {WORK_CONSUMER_FILE, PARTITIONED_PROJECTOR_FILE if partitions == 1 else PROJECTOR_CONSUMER_FILE}
    groups = [body for stem, body in _read("consumer") if f"consumer/{stem}.json" not in unused]
    return Filled(
        streams=[definitions.fill(body, values, repeated) for _, body in _read("stream")],
        kv=[definitions.fill(body, values, repeated) for _, body in _read("kv")],
        consumers=[consumer for group in groups for consumer in definitions.fill(group, values, repeated)],
    )


def filled_work_consumer(settings: Settings, region: str, priority: str, task_type: str) -> dict[str, Any]:
    """The WORK durable of one region, priority and task type (``{"stream_name", "config"}``)."""
    values = {**placeholders(settings), "region": region, "priority": priority, "type": task_type, "type_token": subjects.type_token(task_type)}
    return cast(dict[str, Any], definitions.fill(_read_work_consumer(), values, {}))


@functools.cache
def _read_work_consumer() -> Any:
    return definitions.read_one(WORK_CONSUMER_FILE)


def _typed(api: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``api`` with its enum fields as nats-py's enums."""
    return {key: _ENUMS[key](value) if key in _ENUMS else value for key, value in api.items()}


def stream_configs(settings: Settings) -> list[StreamConfig]:
    """Every stream streamsched needs (``stream/*.json``; a KV bucket's stream is created by nats-py)."""
    return [StreamConfig.from_response(_typed(api)) for api in filled(settings).streams]


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


def _kv_config(api: dict[str, Any]) -> KeyValueConfig:
    seconds = {key: api[key] / NANOSECONDS for key in _KV_DURATIONS if key in api}
    return KeyValueConfig.from_response({**_typed(api), **seconds})


def kv_configs(settings: Settings) -> list[KeyValueConfig]:
    """Every bucket (``kv/*.json``; the module's docstring says what each holds)."""
    return [_kv_config(api) for api in filled(settings).kv]


def kv_config(settings: Settings) -> KeyValueConfig:
    """The ``tasks`` bucket: one revision per task, expiring with the events it folds."""
    return next(kv for kv in kv_configs(settings) if kv.bucket == subjects.STATE_BUCKET)


def kv_stream(kv: dict[str, Any]) -> dict[str, Any]:
    """The stream nats-py's ``create_key_value`` makes for the bucket ``kv`` (both API shapes),
    for whoever creates it another way (NACK: :mod:`streamsched.nack`). NATS clients differ
    here: nats.go, and so NACK's own ``KeyValue``, allows per-message TTLs only with a limit
    marker TTL, and the ``idempotency`` bucket needs them without one."""
    bucket, ttl = kv["bucket"], kv.get("ttl", 0)
    window = nanoseconds(KV_DUPLICATE_WINDOW_S)
    stream = {
        "name": f"KV_{bucket}",
        "subjects": [f"$KV.{bucket}.>"],
        "storage": kv.get("storage"),
        "num_replicas": kv.get("replicas", 1),
        "max_msgs_per_subject": kv.get("history", 1),
        "max_age": ttl or None,  # none: kept until replaced
        "max_bytes": kv.get("max_bytes"),
        "max_msg_size": kv.get("max_value_size"),
        "max_msgs": -1,
        "max_consumers": -1,
        "discard": DiscardPolicy.NEW.value,
        "duplicate_window": min(window, ttl) if ttl else window,
        "allow_direct": kv.get("direct"),
        "allow_rollup_hdrs": True,
        "allow_msg_ttl": True,
        "deny_delete": True,
        "subject_delete_marker_ttl": kv.get("limit_marker_ttl") or None,
    }
    return {key: value for key, value in stream.items() if value is not None}


def _consumer_config(api: dict[str, Any]) -> ConsumerConfig:
    config: ConsumerConfig = ConsumerConfig.from_response(_typed(api))
    return config


def consumer_configs(settings: Settings) -> list[tuple[str, ConsumerConfig]]:
    """``(stream, config)`` of every role's durable pull consumer, in the files' order (``consumer/*.json``)."""
    return [(api["stream_name"], _consumer_config(api["config"])) for api in filled(settings).consumers]


def work_consumer_config(settings: Settings, region: str, priority: str, task_type: str) -> ConsumerConfig:
    """The durable on WORK of one region, priority and task type. Workers create it for the
    types they load (:func:`ensure_work_consumers`): the types are known only to them."""
    return _consumer_config(filled_work_consumer(settings, region, priority, task_type)["config"])


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


#: TTLs closer than this are the same (the server keeps nanoseconds, the config float seconds).
TTL_TOLERANCE_S = 0.001
#: Buckets whose entries are all heartbeats, put again within ``worker_heartbeat_s``: one whose
#: storage differs from its definition (JetStream cannot change it in place) is made again.
HEARTBEAT_BUCKETS = frozenset({subjects.WORKERS_BUCKET, subjects.REGIONS_BUCKET})


@dataclass(frozen=True)
class Change:
    """One line of what ``streams apply`` did."""

    kind: str  # "stream", "consumer" or "kv"
    name: str
    action: str  # "created", "updated", "recreated" (a heartbeat bucket), "deleted" or "kept" (an old projector durable), "unchanged"
    detail: str = ""

    def __str__(self) -> str:
        tail = f" ({self.detail})" if self.detail else ""
        return f"{self.action:<9} {self.kind:<8} {self.name}{tail}"


def _differences(desired: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(key for key, value in desired.items() if current.get(key) != value)


async def apply(bus: Bus, settings: Settings, *, prune_projectors: bool = False) -> list[Change]:
    """Create what is missing and update what differs; safe to run on every start.

    With another ``projector_partitions`` than the server's projector durables have, it
    makes the new count's durables, each starting where the slowest of the old ones stands
    (so nothing is folded twice but what was in flight), and deletes the old ones that
    nothing is lost with (:func:`_delete_unused_projectors`; ``prune_projectors`` deletes
    them all)."""
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
        if kv.bucket in HEARTBEAT_BUCKETS and kv.storage is not None and current.storage != kv.storage:
            await js.delete_key_value(kv.bucket)
            await js.create_key_value(kv)
            changes.append(Change("kv", kv.bucket, "recreated", f"storage {kv.storage.value}: its entries come back within a heartbeat"))
            continue
        # The TTL follows settings that may change (worker_heartbeat_s, cancel_ttl_s ...);
        # the dedupe window may not be longer, as nats-py makes it for a new bucket.
        if abs((current.max_age or 0.0) - (kv.ttl or 0.0)) > TTL_TOLERANCE_S:
            window = min(KV_DUPLICATE_WINDOW_S, kv.ttl) if kv.ttl else KV_DUPLICATE_WINDOW_S
            await js.update_stream(replace(current, max_age=kv.ttl or 0.0, duplicate_window=window))
            changes.append(Change("kv", kv.bucket, "updated", "ttl"))
        else:
            changes.append(Change("kv", kv.bucket, "unchanged"))

    projectors_start = await _projectors_start(bus)
    for stream, consumer in [*consumer_configs(settings), *await _work_consumer_configs(bus, settings)]:
        name = consumer.durable_name
        assert name is not None
        try:
            current_consumer = (await js.consumer_info(stream, name)).config
        except NotFoundError:
            detail = ""
            if projectors_start is not None and subjects.is_projector_consumer(name):
                consumer = replace(consumer, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=projectors_start)
                detail = f"from EVENTS sequence {projectors_start}, where the projector durables before it stood"
            await js.add_consumer(stream, consumer)
            changes.append(Change("consumer", f"{stream}/{name}", "created", detail))
            continue
        # Where a durable starts is set when it is made and cannot change: kept as it is.
        consumer = replace(consumer, deliver_policy=current_consumer.deliver_policy, opt_start_seq=current_consumer.opt_start_seq)
        diff = _differences(consumer.as_dict(), current_consumer.as_dict())
        if diff:
            # add_consumer updates an existing durable in place (the server creates or updates).
            await js.add_consumer(stream, consumer)
        changes.append(Change("consumer", f"{stream}/{name}", "updated" if diff else "unchanged", ", ".join(diff)))
    return changes + await _delete_unused_projectors(bus, settings, prune=prune_projectors)


async def projector_durables(bus: Bus) -> list[ConsumerInfo]:
    """The projectors' durables on EVENTS as they are on the server (one, or one per
    partition), whatever this process's ``projector_partitions`` says."""
    infos: list[ConsumerInfo] = []
    while page := await bus.js.consumers_info(subjects.EVENTS_STREAM, offset=len(infos)):
        infos += page
    return [info for info in infos if subjects.is_projector_consumer(info.name)]


async def _projectors_start(bus: Bus) -> int | None:
    """The EVENTS sequence a new projector durable starts from while others exist: just past
    the lowest ack floor among them, so that it reads everything one of them has not
    folded. None when there are none (a new deployment's durable reads EVENTS whole)."""
    # Read before the durables: one with nothing pending then has folded at least this far,
    # though its ack floor stays at the last event of its own subjects.
    last = (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    floors = [_floor(info) if info.num_pending or info.num_ack_pending else last for info in await projector_durables(bus)]
    return min(floors) + 1 if floors else None


def _floor(info: ConsumerInfo) -> int:
    """The EVENTS sequence up to which a durable has acked every message."""
    return info.ack_floor.stream_seq if info.ack_floor else 0


def _start(info: ConsumerInfo) -> int:
    """The first EVENTS sequence a durable reads."""
    config = info.config
    if config.deliver_policy == DeliverPolicy.BY_START_SEQUENCE and config.opt_start_seq:
        return config.opt_start_seq
    return 1


def event_filters(info: ConsumerInfo) -> list[str]:
    """The EVENTS subjects a durable reads (partition 0's durable reads two)."""
    return info.config.filter_subjects or [info.config.filter_subject or subjects.EVENTS_ALL]


def _read_by(kept: list[ConsumerInfo], gone: ConsumerInfo) -> bool:
    """Whether ``kept`` read every event ``gone`` has not folded: they started at or before
    its ack floor, on its subjects. One partition's ``events.>`` counts as read by the
    partitions: its events are on ``events.<source>`` (recorders of one partition),
    which partition 0 reads, or on the partitions of the recorders already on the new
    count."""
    if any(_start(info) > _floor(gone) + 1 for info in kept):
        return False
    read = {subject for info in kept for subject in event_filters(info)}
    return subjects.EVENTS_ALL in read or all(subject in read or subject == subjects.EVENTS_ALL for subject in event_filters(gone))


async def _delete_unused_projectors(bus: Bus, settings: Settings, *, prune: bool) -> list[Change]:
    """Delete the projector durables of another ``projector_partitions``: left behind, each
    would keep every later event of its subjects pending. One whose events not yet folded
    no durable kept reads (a partition dropped by a lower count) is kept until it has
    folded them, unless ``prune``: ``replay rebuild-state`` folds what it had left."""
    wanted = set(subjects.projector_consumers(settings.projector_partitions))
    durables = await projector_durables(bus)
    kept = [info for info in durables if info.name in wanted]
    changes: list[Change] = []
    for info in durables:
        if info.name in wanted:
            continue
        name = f"{subjects.EVENTS_STREAM}/{info.name}"
        unfolded = (info.num_pending or 0) + (info.num_ack_pending or 0)
        why = f"projector_partitions is {settings.projector_partitions}"
        if unfolded and not _read_by(kept, info):
            if not prune:
                why += (
                    f"; its {unfolded} messages not folded yet are on subjects no other durable reads: "
                    "apply again once its projector has folded them (or --prune-projectors)"
                )
                changes.append(Change("consumer", name, "kept", why))
                continue
            why += f"; it had {unfolded} messages not folded: `streamsched replay rebuild-state` folds them"
        await bus.js.delete_consumer(subjects.EVENTS_STREAM, info.name)
        changes.append(Change("consumer", name, "deleted", why))
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
