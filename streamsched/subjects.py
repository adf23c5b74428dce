"""Every external name: subjects, streams, consumers, KV buckets and headers.

No other module builds a subject with an f-string; they call these functions, so a
rename happens here once (the idea of arq's ``constants.py``).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence

#: Ingress: anyone publishes a JSON task here (``nats pub tasks.submit '{...}'``); its
#: priority is read from its body. :func:`submit` names the priority in the subject instead.
SUBMIT = "tasks.submit"
#: Invalid submissions, with the original bytes as body and the reason in a header.
REJECTED = "tasks.rejected"
#: Requests to cancel a task (``streamsched cancel``), read by the masters' cancellers.
CANCEL = "tasks.cancel"
#: Requests to change a queued task's priority (``streamsched reprioritize``), read by the masters.
REPRIORITIZE = "tasks.reprioritize"

#: Stream names.
TASKS_STREAM = "TASKS"
SCHED_STREAM = "SCHED"
WORK_STREAM = "WORK"
EVENTS_STREAM = "EVENTS"
DLQ_STREAM = "DLQ"
TIMERS_STREAM = "TIMERS"
#: Notices of the tasks the projector wrote final, for the masters' resolvers.
FINISHED_STREAM = "FINISHED"
FINISHED = "finished"
#: KV bucket holding the latest state of every task (a projection of EVENTS).
STATE_BUCKET = "tasks"
#: KV bucket of cancelled task ids (key = task id), kept for ``cancel_ttl_s``.
CANCELS_BUCKET = "cancels"
#: KV bucket of the tasks waiting for dependencies (key = task id; see :mod:`streamsched.roles.dependencies`).
WAITING_BUCKET = "waiting"
#: KV bucket of dependency edges: key ``<dependency id>.<dependant id>``, found by the dependency.
DEPENDANTS_BUCKET = "dependants"
#: KV bucket of workflow states (key = workflow id; see :mod:`streamsched.roles.workflows`).
WORKFLOWS_BUCKET = "workflows"
#: KV bucket of cron schedule definitions (key = schedule name).
SCHEDULES_BUCKET = "schedules"
#: KV bucket of priority overrides (key = task id; see :mod:`streamsched.roles.reprioritize`).
PRIORITIES_BUCKET = "priorities"
#: KV bucket of idempotency keys (value = the id of the task that took the key), each with a TTL.
IDEMPOTENCY_BUCKET = "idempotency"
#: KV bucket of the live workers (key = :func:`worker_key`; see :mod:`streamsched.roles.worker_registry`).
WORKERS_BUCKET = "workers"
#: KV bucket of the live regional schedulers and their regions' headroom (key = :func:`region_key`;
#: see :mod:`streamsched.roles.region_registry`).
REGIONS_BUCKET = "regions"
#: KV bucket of the circuit breakers, one per region and task type (key = :func:`breaker_key`;
#: see :mod:`streamsched.roles.breakers`).
BREAKERS_BUCKET = "breakers"
#: KV bucket of the concurrency keys' and fair shares' slots and the rate limits' token
#: buckets (see :mod:`streamsched.roles.limits`).
LIMITS_BUCKET = "limits"

#: Durable consumer names that are not per region.
MASTER_CONSUMER = "master"
#: The projector's durable on EVENTS (with one partition; see :func:`projector_consumers`).
PROJECTOR_CONSUMER = "projector"
CANCELLER_CONSUMER = "canceller"
#: The masters' durable on ``tasks.reprioritize`` (one request at a time, cluster-wide).
REPRIORITIZER_CONSUMER = "reprioritizer"
#: The masters' durable on FINISHED.
RESOLVER_CONSUMER = "resolver"
#: Durable on TIMERS reading the dependency timeouts that fired (every master reads it).
DEPS_TIMEOUT_CONSUMER = "deps-timeouts"
#: The masters' durable on ``timers.due`` (what TIMERS fires).
TIMERS_CONSUMER = "master-timers"

#: Headers. Routing data travels in headers so hops forward payload bytes untouched.
H_TASK_ID = "Streamsched-Task-Id"
H_TYPE = "Streamsched-Type"
H_PRIORITY = "Streamsched-Priority"
H_REGION = "Streamsched-Region"
H_MAX_ATTEMPTS = "Streamsched-Max-Attempts"
H_TIMEOUT = "Streamsched-Timeout"
H_REASON = "Streamsched-Reason"
H_ERROR = "Streamsched-Error"
H_ATTEMPTS = "Streamsched-Attempts"
H_MSG_ID = "Nats-Msg-Id"
#: Absolute deadline of a task (Unix seconds): no attempt starts after it.
H_DEADLINE = "Streamsched-Deadline"
#: On a cron schedule in TIMERS (and what it fires): the schedule's name.
H_SCHEDULE = "Streamsched-Schedule"
#: Set by nats-server on what a message schedule fired: the schedule's subject.
H_SCHEDULER = "Nats-Scheduler"
#: On a task moved to another priority: the override it was moved by (see :mod:`streamsched.roles.reprioritize`).
H_GENERATION = "Streamsched-Generation"
#: On a task moved to another priority: the attempts it had used before the move (its new
#: copy's delivery count starts again at 1).
H_ATTEMPTS_BEFORE = "Streamsched-Attempts-Before"
#: On a SCHED message that holds several tasks: how many (see :mod:`streamsched.roles.sched_batches`).
H_BATCH = "Streamsched-Batch"
#: On a task under a concurrency key, a rate limit or a fair share: which (see :mod:`streamsched.roles.limits`).
H_LIMITS = "Streamsched-Limits"
#: On a task admitted past its limits: the KV ``limits`` slots it holds until its outcome, as ``key=revision`` pairs.
H_SLOTS = "Streamsched-Slots"

#: A task id or region name must be one subject token: no dots, wildcards or spaces.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def is_token(value: str) -> bool:
    """True when ``value`` can be used as a single subject token."""
    return TOKEN_RE.fullmatch(value) is not None


#: A task type is the tail of its WORK subject: dot-separated words of A-Z a-z 0-9 _ - : /
#: (``emails.send``), so no empty word and no wildcard.
TYPE_RE = re.compile(r"[A-Za-z0-9_:/-]+(?:\.[A-Za-z0-9_:/-]+)*")
#: Longest task type.
MAX_TYPE_CHARS = 200


def is_type(value: str) -> bool:
    """True when ``value`` is a valid task type (see :data:`TYPE_RE`)."""
    return len(value) <= MAX_TYPE_CHARS and TYPE_RE.fullmatch(value) is not None


def submit(priority: str) -> str:
    """The ingress subject of one priority, ``tasks.submit.<priority>``: the master drains
    these highest first, so a submission here does not wait behind lower ones at the door."""
    return f"{SUBMIT}.{priority}"


def submit_for(priority: str | None, priorities: Sequence[str]) -> str:
    """Where a message of tasks of ``priority`` goes: its :func:`submit` subject when it is one
    of ``priorities`` (the deployment's; TASKS takes no other), else plain ``tasks.submit``,
    where the master reads each task's own and rejects one it does not know, with the reason."""
    return submit(priority) if priority is not None and priority in priorities else SUBMIT


#: Consumer filters over every ingress subject, plain and per priority (to read them all back).
SUBMIT_ALL = (SUBMIT, f"{SUBMIT}.*")


def is_submit(subject: str) -> bool:
    """True for ``tasks.submit`` and ``tasks.submit.<priority>``."""
    return subject == SUBMIT or (subject.startswith(SUBMIT + ".") and subject.count(".") == SUBMIT.count(".") + 1)


def master_consumer(priority: str) -> str:
    """The masters' durable on ``tasks.submit.<priority>`` (``master`` reads plain ``tasks.submit``)."""
    return f"{MASTER_CONSUMER}-{priority}"


def sched(region: str, priority: str) -> str:
    """The SCHED subject a master publishes to for one region and priority."""
    return f"sched.{region}.{priority}"


def delayed(task_id: str) -> str:
    """The TIMERS subject holding a delayed task as a message schedule until its time."""
    return f"timers.at.{task_id}"


def cron(name: str) -> str:
    """The TIMERS subject holding a cron schedule (one live schedule per subject)."""
    return f"timers.cron.{name}"


#: Where nats-server puts what a schedule in TIMERS fires (read by the masters).
TIMERS_DUE = "timers.due"
#: Where a dependency timeout fires (read by the projector's dependency resolver).
DEPS_DUE = "timers.deps-due"


def dependency_timer(task_id: str) -> str:
    """The TIMERS subject of the schedule that ends a task's wait for its dependencies."""
    return f"timers.deps.{task_id}"


def edge_key(dependency: str, dependant: str) -> str:
    """KV ``dependants`` key of one edge: found by its dependency's id (``<dependency>.*``)."""
    return f"{dependency}.{dependant}"


#: Every TIMERS subject: the schedules (which no consumer reads) and ``timers.due``.
TIMERS_ALL = "timers.>"


def work(region: str, priority: str, task_type: str) -> str:
    """The WORK subject a regional scheduler releases a task of ``task_type`` onto: the type
    is in the subject so that a worker fetches only the types it has handlers for."""
    return f"work.{region}.{priority}.{task_type}"


#: Every WORK subject.
WORK_ALL = "work.>"


def parse_work(subject: str) -> tuple[str, str, str] | None:
    """``(region, priority, type)`` of a WORK subject; None for another subject."""
    parts = subject.split(".", 3)
    if len(parts) != 4 or parts[0] != "work":
        return None
    return parts[1], parts[2], parts[3]


def events(source: str, partition: int | None = None) -> str:
    """The EVENTS subject of the messages one kind of role records (``events.master``…), or
    with ``partition``, those of its events whose tasks fall in that projector partition
    (``events.master.3``; see :func:`event_partition`).

    A message holds events of any tasks (see :mod:`streamsched.eventlog.recorder`), so the subject
    names who recorded them, not a task. EVENTS takes ``events.>``: earlier versions
    published each task's events on ``events.<task_id>.<kind>``, and readers still read those.
    """
    return f"events.{source}" if partition is None else f"events.{source}.{partition}"


#: The filter over every EVENTS message.
EVENTS_ALL = "events.>"
#: What a role that records events publishes on: ``events.<source>`` and ``events.<source>.<partition>``.
EVENTS_RECORDED = ("events.*", "events.*.*")


def event_partition(task_id: str, partitions: int) -> int:
    """The projector partition of a task's events: a hash of its id (stable across processes
    and versions, unlike Python's ``hash``), modulo ``projector_partitions``."""
    return zlib.crc32(task_id.encode()) % partitions


def projector_consumers(partitions: int) -> list[str]:
    """The projectors' durables on EVENTS: ``projector`` on every event with one partition,
    else ``projector-0`` ... ``projector-<N-1>``, one per partition."""
    return [PROJECTOR_CONSUMER] if partitions == 1 else [projector_consumer(k) for k in range(partitions)]


def is_projector_consumer(name: str) -> bool:
    """Whether ``name`` is a projector's durable, for any number of partitions."""
    return name == PROJECTOR_CONSUMER or re.fullmatch(rf"{PROJECTOR_CONSUMER}-\d+", name) is not None


def projector_consumer(partition: int) -> str:
    """The durable of one projector partition (with ``projector_partitions`` above 1)."""
    return f"{PROJECTOR_CONSUMER}-{partition}"


def dlq(task_id: str) -> str:
    """Where a dead task is kept with its last error."""
    return f"dlq.{task_id}"


def sched_consumer(region: str, priority: str) -> str:
    """Durable on SCHED read by the regional schedulers of ``region``."""
    return f"regional-{region}-{priority}"


def type_token(task_type: str) -> str:
    """``task_type`` as a part of a consumer name, which takes no dots or slashes: with those
    replaced and followed by a digest of its exact spelling (``a.b`` and ``a_b`` stay apart)."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", task_type)[:48]
    digest = hashlib.blake2s(task_type.encode(), digest_size=4).hexdigest()
    return f"{readable}-{digest}"


def work_consumer(region: str, priority: str, task_type: str) -> str:
    """Durable on WORK of one task type and priority, shared by every worker of ``region``
    that handles the type (its definition, ``consumer/worker.json`` in the definition files,
    spells the same name)."""
    return f"worker-{region}-{priority}-{type_token(task_type)}"


def state_key(task_id: str) -> str:
    """KV key of one task's state (the id itself; kept as a function for one place to change)."""
    return task_id


#: What a worker id may not hold in a KV key or a subject token (a host name may have dots).
_NOT_IN_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_NOT_IN_KV_KEY = re.compile(r"[^A-Za-z0-9_=/.-]")


def worker_key(worker_id: str) -> str:
    """KV ``workers`` key (and subject token) of a worker: its id with every character a
    token may not hold (dots of a host name, say) as ``_``. Applying it twice changes nothing."""
    return _NOT_IN_TOKEN.sub("_", worker_id)


def region_key(region: str, scheduler_id: str) -> str:
    """KV ``regions`` key of one regional scheduler: ``<region>.<scheduler key>`` (the
    scheduler id made a token as :func:`worker_key` does), so ``<region>.*`` finds a region's."""
    return f"{region}.{worker_key(scheduler_id)}"


def breaker_key(region: str, task_type: str) -> str:
    """KV ``breakers`` key of the breaker of ``task_type`` in ``region``: ``<region>.<type>``,
    the type as it is when a KV key may hold it, else with the other characters as ``_`` and
    a digest of its exact spelling after it (the value names the type itself)."""
    readable = _NOT_IN_KV_KEY.sub("_", task_type)
    if readable != task_type:
        readable += "-" + hashlib.blake2s(task_type.encode(), digest_size=4).hexdigest()
    return f"{region}.{readable}"


def worker_drain(worker_id: str) -> str:
    """Core NATS subject on which one worker answers a drain request (no stream stores it)."""
    return f"streamsched.workers.{worker_key(worker_id)}.drain"


def held(priority: str, lane: str) -> str:
    """The SCHED subject where a regional scheduler parks a task until its limits admit it:
    one per lane (tasks under the same limits, of one region, type and priority), in order."""
    return f"held.{priority}.{lane}"


#: Every lane's subject (in SCHED; no consumer reads them: admission takes a lane's oldest by direct get).
HELD_ALL = "held.*.*"


def msg_id(task_id: str, hop: str, attempt: int = 0) -> str:
    """``Nats-Msg-Id`` stable for one task, hop and attempt, so a redelivered hop dedupes."""
    return f"{task_id}:{hop}:{attempt}"
