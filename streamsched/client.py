"""The Python client: submit tasks, read their state, wait for their outcome.

Async (``async with await Client.connect(url) as client``; nats-py is asyncio-only).
A submission is a JetStream publish to ``tasks.submit.<priority>`` carrying
the task id as ``Nats-Msg-Id``, so a retried submit inside the dedupe window is stored
once. The id is chosen here when the caller gives none, so the handle exists at once.
A publish that a full stream refuses is sent again, with the same ``Nats-Msg-Id``, with
backoff for up to ``submit_retry_budget_s``, then :class:`~streamsched.errors.Overloaded`
names the limit (see :mod:`streamsched.transport.overload`); other errors are raised as they come.
The subject names the priority so that the masters take a high task in ahead of a burst
of low ones already waiting (see :mod:`streamsched.roles.master`); a message whose tasks
are of several priorities (a workflow, a batch), or of a priority the client's settings do
not list, goes to plain ``tasks.submit``, where the master reads each task's own.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import msgspec
from opentelemetry.trace import SpanKind

from . import subjects, tracing
from .config import Settings
from .errors import AlreadyFinished, NotFound, Rejected
from .eventlog import dlq
from .eventlog import events as ev
from .eventlog import reader as eventlog
from .eventlog.state import StateStore, is_final
from .model import (
    DEFAULT_PRIORITY,
    Envelope,
    Status,
    TaskState,
    _base32,
    decode_submission,
    raw_value,
    state_decoder,
)
from .roles import batches, region_registry, reprioritize, routing, schedules, worker_registry
from .roles.breakers import Breaker, force, read_breakers
from .roles.cancels import request_message
from .roles.checks import check_fields
from .roles.idempotency import claim, give_back
from .roles.intake import decode_wrapper
from .roles.limits import KeyInUse, Lane, keys_in_use
from .roles.limits import lanes as limit_lanes
from .roles.workflows import WorkflowState, WorkflowTracker, global_id
from .transport import overload
from .transport.bus import Bus, explain

T = TypeVar("T")
#: ``(subject, body, headers)`` of one publish.
Publication = tuple[str, bytes, dict[str, str] | bytes | None]

#: Seconds :meth:`Client.cancel` looks for a task (or workflow) without a state yet before
#: :class:`NotFound`, and how often.
CANCEL_FIND_S = 2.0
CANCEL_FIND_POLL_S = 0.05


def new_task_id() -> str:
    """A time-sortable, random, ULID-shaped id (26 characters)."""
    return _base32(time.time_ns() // 1_000_000, 10) + _base32(int.from_bytes(os.urandom(10)), 16)


def _submission(spec: Mapping[str, Any], *, with_id: bool = True) -> tuple[str, bytes]:
    """A task's id (chosen here if not given) and its encoded envelope, from
    :meth:`Client.submit`'s arguments by name (``with_id=False``: a template, no id)."""
    fields = {key: value for key, value in spec.items() if value is not None}
    task_id = fields.pop("id", None) or (new_task_id() if with_id else "")
    payload = msgspec.Raw(msgspec.json.encode(fields.pop("payload", None)))
    labels = dict(fields.pop("labels", None) or {})
    try:
        envelope = Envelope(id=task_id or None, payload=payload, labels=labels, **fields)
    except TypeError as exc:  # a misspelt or missing argument
        raise TypeError(f"not a task's arguments ({', '.join(map(str, spec))}): {exc}") from None
    return task_id, msgspec.json.encode(envelope)


def _traced_headers(task_id: str) -> dict[str, str]:
    """The headers of one task of :meth:`Client.submit_many` with tracing on: a ``submit`` span of its own."""
    traceparent = tracing.hop("submit", None, {"streamsched.task.id": task_id}, kind=SpanKind.PRODUCER)
    return {subjects.H_MSG_ID: task_id, tracing.TRACEPARENT: traceparent}


def _priority_of(spec: Mapping[str, Any]) -> str | None:
    """The priority a task's arguments (or a workflow's task) give it: the default when none."""
    priority = spec.get("priority")
    return DEFAULT_PRIORITY if priority is None else priority if isinstance(priority, str) else None


def prepare(spec: Mapping[str, Any], settings: Settings) -> tuple[str, bytes]:
    """A task's id and encoded envelope, checked as the master will check it: raises
    :class:`~streamsched.errors.Rejected` (or :class:`TypeError` for a misspelt argument)
    with the reason."""
    task_id, body = _submission(spec)
    check_fields(decode_submission(body, max_bytes=settings.max_payload_bytes), settings)
    return task_id, body


class TaskHandle:
    """A submitted task: ask for its state, or wait for its outcome."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client = client
        self.id = task_id

    async def status(self) -> TaskState | None:
        return await self.client.get(self.id)

    async def result(self, timeout_s: float = 60.0) -> Any:
        """The handler's return value; raises :class:`RuntimeError` if the task did not succeed."""
        state = await self.client.wait(self.id, timeout_s=timeout_s)
        if state.status is not Status.SUCCEEDED:
            raise RuntimeError(f"task {self.id} ended {state.status.value}: {state.error}")
        return raw_value(state.result)

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"


class Client:
    """Connection to a streamsched deployment."""

    def __init__(self, bus: Bus, store: StateStore, settings: Settings | None = None) -> None:
        """``settings`` are the deployment's (priorities, regions, limits, ``idempotency_ttl_s``),
        for what the client checks before it sends; the defaults when not given."""
        self.bus = bus
        self.store = store
        self._workflows: WorkflowTracker | None = None
        self.settings = settings or Settings()

    @classmethod
    async def connect(cls, url: str = "nats://127.0.0.1:4222", *, name: str = "streamsched-client", settings: Settings | None = None) -> Client:
        tracing.configure(name)  # on only if the OTEL_* variables ask for export
        bus = await Bus.connect(url, name=name)
        return cls(bus, await StateStore.open(bus), settings)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.bus.close()

    async def submit(
        self,
        type: str,
        payload: Any = None,
        *,
        id: str | None = None,
        priority: str = DEFAULT_PRIORITY,
        region: str | None = None,
        region_failover: str | None = None,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
        run_at: str | None = None,
        delay_s: float | None = None,
        deadline: str | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
        depends_on: Sequence[str] = (),
        dependency_timeout_s: float | None = None,
        on_dependency_failure: str = "cancel",
        split: Mapping[str, Any] | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        rate_key: str | None = None,
        fairness_key: str | None = None,
    ) -> TaskHandle:
        """Submit a task and return its handle once JetStream has stored it.

        With ``idempotency_key``: if a task took that key within ``idempotency_ttl_s``,
        nothing is submitted and the handle is that first task's. ``depends_on`` names tasks
        that must succeed first (they may be submitted later); ``split`` fans the task out
        into chunks (see the README). ``concurrency_key`` (with ``concurrency_limit``, or the
        ``concurrency_limits`` setting), ``rate_key`` and ``fairness_key`` put it under limits
        shared across the cluster (see the README). ``region_failover`` (``wait`` or ``any``): what a task
        pinned to ``region`` does while that region has no live scheduler or worker.

        Raises :class:`~streamsched.errors.Overloaded` when TASKS stayed full for
        ``submit_retry_budget_s`` (nothing was stored; an idempotency key taken is given back).
        """
        task_id, body = _submission(
            {
                "type": type,
                "payload": payload,
                "id": id,
                "priority": priority,
                "region": region,
                "region_failover": region_failover,
                "timeout_s": timeout_s,
                "max_attempts": max_attempts,
                "labels": labels,
                "run_at": run_at,
                "delay_s": delay_s,
                "deadline": deadline,
                "deadline_s": deadline_s,
                "idempotency_key": idempotency_key,
                "depends_on": list(depends_on),
                "dependency_timeout_s": dependency_timeout_s,
                "on_dependency_failure": on_dependency_failure,
                "split": dict(split) if split is not None else None,
                "concurrency_key": concurrency_key,
                "concurrency_limit": concurrency_limit,
                "rate_key": rate_key,
                "fairness_key": fairness_key,
            }
        )
        subject = self.submit_subject((priority,))
        traced = {"streamsched.task.id": task_id, "streamsched.task.type": type}
        if idempotency_key is None:
            await self._submit(subject, body, task_id, traced)
            return TaskHandle(self, task_id)
        taken = await claim(self.bus, idempotency_key, task_id, self.settings.idempotency_ttl_s)
        if not taken.taken_now:  # whoever holds it, this one included: nothing is sent again
            return TaskHandle(self, taken.holder)
        try:
            await self._submit(subject, body, task_id, traced)
        except BaseException:
            await give_back(self.bus, idempotency_key, taken)  # else the key would name a task that never came
            raise
        return TaskHandle(self, task_id)

    async def submit_message(self, data: bytes) -> list[str]:
        """Submit what a publisher would send to ``tasks.submit``: one task's JSON, a batch
        (``{"batch": [...]}``, all or nothing) or a workflow (``{"workflow": {...}}``); returns
        the task ids (a workflow's id). What the REST and NATS service APIs take.

        A task is checked here as the master checks it, so a bad one raises
        :class:`~streamsched.errors.Rejected` (its ``field`` names the field) and nothing is
        sent; a task without an id gets one. The tasks of a batch are checked the same way,
        each naming its index; a workflow is checked by the master, which records a
        ``rejected`` state under its id when it is invalid.
        """
        if len(data) > self.settings.max_payload_bytes:
            raise Rejected(f"the submission is {len(data)} bytes, over the limit of {self.settings.max_payload_bytes}")
        try:
            submission = decode_submission(data, max_bytes=self.settings.max_payload_bytes)
        except Rejected as not_a_task:
            wrapper = decode_wrapper(data)
            if wrapper is None:
                raise not_a_task from None
            if wrapper.workflow is not None:
                return [(await self.submit_workflow(wrapper.workflow)).id]
            if not wrapper.batch:
                raise Rejected("`batch` holds no task") from None
            specs = []
            for index, item in enumerate(wrapper.batch):
                if not isinstance(item, dict):
                    raise Rejected(f"`batch.{index}` is not a task object") from None
                try:
                    prepare(item, self.settings)
                except Rejected as exc:
                    inner = exc.field
                    raise Rejected(f"task {index} of the batch is invalid: {exc}", field=f"batch.{index}" + (f".{inner}" if inner else "")) from None
                except TypeError as exc:  # a field no task has
                    raise Rejected(f"task {index} of the batch is invalid: {exc}", field=f"batch.{index}") from None
                specs.append(item)
            return [handle.id for handle in await self.submit_many(specs, atomic=True)]
        check_fields(submission, self.settings)
        task_id = submission.id or new_task_id()
        body = data if submission.id else msgspec.json.encode(msgspec.structs.replace(submission, id=task_id))
        traced = {"streamsched.task.id": task_id, "streamsched.task.type": submission.type}
        await self._submit(self.submit_subject((submission.priority,)), body, task_id, traced)
        return [task_id]

    async def submit_many(self, tasks: Iterable[Mapping[str, Any]], *, window: int = 4000, atomic: bool = False) -> list[TaskHandle]:
        """Submit many tasks at once (Celery's ``group``, Dramatiq's ``group.run()``).

        Each item holds :meth:`submit`'s arguments by name (``type`` is required). Up to
        ``window`` submissions wait for their PubAck at a time, and every hundred share one
        landing: about 16 µs of this process's CPU per task, envelope included, against
        150–190 µs for a loop of ``submit``, which waits for each PubAck in turn. Returns
        the handles once JetStream has stored every task. Publishes a full TASKS refused
        are sent again (those chunks only) with backoff for up to ``submit_retry_budget_s``,
        then it raises :class:`~streamsched.errors.Overloaded`; if a publish failed otherwise
        it raises :class:`ConnectionError`. Either way, submitting the same tasks again (with
        the same ids) is safe, since each carries its id as ``Nats-Msg-Id``. A misspelt
        argument raises :class:`TypeError` before anything is published.
        """
        # Encoded first, so that a misspelt argument stops the group before any of it is sent.
        specs = list(tasks)
        submissions = [_submission(spec) for spec in specs]
        priorities = [_priority_of(spec) for spec in specs]
        if atomic:
            return await self._submit_batch(submissions, self.submit_subject(priorities))
        each = [self.submit_subject((priority,)) for priority in priorities]
        pairs = zip(submissions, each, strict=True)
        if tracing.ENABLED:
            publications = ((subject, body, _traced_headers(task_id)) for (task_id, body), subject in pairs)
        else:
            publications = ((subject, body, {subjects.H_MSG_ID: task_id}) for (task_id, body), subject in pairs)
        handles = [TaskHandle(self, task_id) for task_id, _ in submissions]
        unstored: list[Publication] = []
        failed, first = await self.bus.publish_many(publications, window=window, unstored=unstored)
        backoff: overload.Backoff | None = None
        while failed:
            if not overload.is_full(first):
                raise ConnectionError(f"{failed} of {len(handles)} submissions were not stored (first error: {explain(first)}); submit them again")
            backoff = backoff or overload.Backoff(self.settings.submit_retry_budget_s)
            if not await backoff.wait():
                unsent = f"{failed} of {len(handles)} submissions are not known to be stored"
                detail = f"{unsent}, {backoff.spent()}; submitting the same tasks again (same ids) is safe"
                raise await overload.overloaded(self.bus, first or ConnectionError(), unstored[0][0], detail=detail)
            again, unstored = unstored, []
            failed, first = await self.bus.publish_many(again, window=window, unstored=unstored)
        return handles

    async def cancel(self, task_id: str, *, reason: str = "") -> TaskState | WorkflowState:
        """Ask for the task, or the workflow, to be cancelled; returns its state as it was when
        asked (a :class:`WorkflowState` when ``task_id`` names a workflow).

        Once a master's canceller has the request (stored in JetStream when this returns),
        a delayed, waiting or queued task never starts, and a running one is cancelled (an
        async handler at its next ``await``, a sync one when it checks
        ``current_task().cancelled``). It ends ``cancelled`` with ``reason``: wait for it
        with :meth:`wait`. A workflow's request cancels each of its tasks that has not
        finished, so the workflow ends ``cancelled`` (``failed`` if a task of it had failed):
        wait for it with :meth:`wait_workflow`. Raises :class:`NotFound` for an id without
        a state after :data:`CANCEL_FIND_S` (a task submitted a moment ago has one once the
        projector caught up, usually within milliseconds) and :class:`AlreadyFinished` for a
        task or workflow that had finished (nothing changes then); a task that finishes
        while the request is on its way keeps its outcome. Raises
        :class:`~streamsched.errors.Overloaded` when TASKS stayed full for
        ``submit_retry_budget_s`` (the request was not stored).
        """
        if not subjects.is_token(task_id):
            raise NotFound(f"no task {task_id}")
        deadline = time.monotonic() + CANCEL_FIND_S
        while True:
            workflow = await self.get_workflow(task_id)  # first, as `streamsched status` looks ids up
            if workflow is not None:
                if workflow.finished_at is not None:
                    raise AlreadyFinished(f"workflow {task_id} already {workflow.status}", workflow.status)
                await self._publish(*request_message(task_id, reason, workflow=True))
                return workflow
            state = await self.get(task_id)
            if state is not None:
                break
            if time.monotonic() >= deadline:
                raise NotFound(f"no task {task_id}")
            await anyio.sleep(CANCEL_FIND_POLL_S)
        if is_final(state):
            raise AlreadyFinished(f"task {task_id} already {state.status.value}", state.status.value)
        await self._publish(*request_message(task_id, reason))
        return state

    async def reprioritize(self, task_id: str, priority: str) -> TaskState:
        """Ask for a task that has not started to run at ``priority``; returns its state as it
        was when asked.

        A master moves it to the new level where it waits (on WORK, ahead of the backlog of
        its old level; waiting for dependencies: it is released at the new level), and a
        ``reprioritized`` event records it; it runs once, at the new level. Raises
        :class:`NotFound` for an id without a state after :data:`CANCEL_FIND_S`,
        :class:`AlreadyFinished` for a finished task, :class:`ValueError` for a priority the
        settings do not list; a task that starts while the request is on its way runs at its
        old priority. Raises :class:`~streamsched.errors.Overloaded` when TASKS stayed full.
        """
        if priority not in self.settings.priorities:
            raise ValueError(f"unknown priority {priority!r} (expected one of {', '.join(self.settings.priorities)})")
        if not subjects.is_token(task_id):
            raise NotFound(f"no task {task_id}")
        deadline = time.monotonic() + CANCEL_FIND_S
        while (state := await self.get(task_id)) is None:
            if time.monotonic() >= deadline:
                raise NotFound(f"no task {task_id}")
            await anyio.sleep(CANCEL_FIND_POLL_S)
        if is_final(state):
            raise AlreadyFinished(f"task {task_id} already {state.status.value}", state.status.value)
        await self._publish(*reprioritize.request_message(task_id, priority))
        return state

    async def submit_workflow(self, workflow: Workflow | Mapping[str, Any]) -> WorkflowHandle:
        """Submit a whole DAG in one message (a :class:`Workflow`, or the ``workflow`` object of
        a file: ``{"id": ..., "tasks": [...]}``); returns once JetStream has stored it. The
        master checks all of it before anything runs: :meth:`get_workflow` tells whether it
        was taken in, and ``status`` of its id says why not (a ``rejected`` task state)."""
        spec = workflow.spec() if isinstance(workflow, Workflow) else dict(workflow)
        workflow_id = str(spec.get("id"))
        body = msgspec.json.encode({"workflow": spec})
        # Deduped by content, not only id: a corrected workflow sent again under its id is taken.
        msg_id = f"workflow:{workflow_id}:{zlib.crc32(body):08x}"
        tasks = spec.get("tasks")
        priorities = [_priority_of(task) if isinstance(task, Mapping) else None for task in tasks] if isinstance(tasks, list) else [None]
        await self._submit(self.submit_subject(priorities), body, msg_id, {"streamsched.workflow.id": workflow_id})
        return WorkflowHandle(self, workflow_id)

    async def get_workflow(self, workflow_id: str) -> WorkflowState | None:
        """The workflow's state (its tasks' statuses, counts, overall status), or ``None``."""
        if not subjects.is_token(workflow_id):
            return None
        if self._workflows is None:
            self._workflows = WorkflowTracker(self.bus)
        return await self._workflows.get(workflow_id)

    async def wait_workflow(self, workflow_id: str, *, timeout_s: float = 60.0, poll_s: float = 0.1) -> WorkflowState:
        """Wait until the workflow has finished (succeeded, failed or cancelled)."""
        state: WorkflowState | None = None
        with anyio.move_on_after(timeout_s):
            while state is None or state.finished_at is None:
                await anyio.sleep(poll_s)
                state = await self.get_workflow(workflow_id)
            return state
        if state is None:
            raise NotFound(f"no workflow {workflow_id} after {timeout_s}s")
        raise TimeoutError(f"workflow {workflow_id} still {state.status} after {timeout_s}s")

    async def add_schedule(
        self,
        name: str,
        cron: str,
        type: str,
        payload: Any = None,
        *,
        time_zone: str | None = None,
        paused: bool = False,
        **task: Any,
    ) -> schedules.Schedule:
        """Submit a task of ``type`` at every slot of ``cron``: 6-field cron, seconds first
        (``"0 */5 * * * *"``), a macro (``@hourly``) or ``@every 30s``, read in ``time_zone``
        (IANA, default UTC). ``task`` takes :meth:`submit`'s other arguments (``priority``,
        ``region``, ``timeout_s``, ``max_attempts``, ``labels``) and ``deadline_s``.

        Raises :class:`~streamsched.errors.Rejected` with the reason, storing nothing, when
        the schedule cannot be honoured (a 5-field pattern, ``@every`` under 1 s, an unknown
        zone, a task the master would reject) or the name is taken, and
        :class:`~streamsched.errors.Overloaded` when the server's JetStream storage stayed
        full for ``submit_retry_budget_s`` (as do the other schedule methods).
        """
        _, body = _submission({"type": type, "payload": payload, **task, "id": None}, with_id=False)
        schedule = schedules.Schedule(name=name, cron=cron, template=msgspec.Raw(body), time_zone=time_zone, paused=paused)
        await self._while_full(lambda: schedules.add(self.bus, schedule, self.settings))
        return schedule

    async def list_schedules(self) -> list[schedules.Schedule]:
        """Every schedule, by name."""
        return await schedules.listing(self.bus)

    async def remove_schedule(self, name: str) -> None:
        """Stop a schedule and delete it; :class:`~streamsched.errors.NotFound` if there is none."""
        await self._while_full(lambda: schedules.remove(self.bus, name))

    async def pause_schedule(self, name: str) -> schedules.Schedule:
        """Stop making tasks until :meth:`resume_schedule`; the definition is kept."""
        return await self._while_full(lambda: schedules.set_paused(self.bus, name, True))

    async def resume_schedule(self, name: str) -> schedules.Schedule:
        return await self._while_full(lambda: schedules.set_paused(self.bus, name, False))

    async def dead_tasks(self, *, task_type: str | None = None, limit: int = 1000) -> list[dlq.DeadTask]:
        """Dead tasks in DLQ, oldest first (at most ``limit``), of one type if given (``streamsched dlq list``)."""
        found: list[dlq.DeadTask] = []
        async for entry in dlq.entries(self.bus, task_type=task_type):
            found.append(entry)
            if len(found) >= limit:
                break
        return found

    async def redrive(self, *, task_type: str | None = None, dry_run: bool = False) -> dlq.RedriveReport:
        """Submit the dead tasks (of one type if given, else all) again as new tasks, id
        ``<id>-r<seq>`` (``streamsched dlq redrive``); safe to repeat."""
        dead = [entry async for entry in dlq.entries(self.bus, task_type=task_type)]
        return await dlq.redrive(self.bus, dead, dry_run=dry_run, retry_budget_s=self.settings.submit_retry_budget_s)

    async def history(self, task_id: str) -> list[ev.Event]:
        """The task's events in the order they were stored (what ``streamsched task history`` prints)."""
        if not subjects.is_token(task_id):
            return []
        return [record.event for record in await eventlog.history(self.bus, task_id)]

    async def cluster_info(self) -> dict[str, Any]:
        """The server this client is connected to, the settings it runs with, and each stream's config in brief."""
        nc = self.bus.nc
        streams_found = {}
        for name in (subjects.TASKS_STREAM, subjects.SCHED_STREAM, subjects.WORK_STREAM, subjects.EVENTS_STREAM, subjects.DLQ_STREAM):
            info = await self.bus.js.stream_info(name)
            streams_found[name] = {"subjects": info.config.subjects, "replicas": info.config.num_replicas, "max_bytes": info.config.max_bytes}
        return {
            "server": {"version": str(nc.connected_server_version), "url": nc.connected_url.netloc if nc.connected_url else None},
            "regions": list(self.settings.regions),
            "priorities": list(self.settings.priorities),
            "streams": streams_found,
        }

    async def cluster_stats(self) -> dict[str, Any]:
        """Messages waiting per stream, live workers and their load, and regional schedulers per region."""
        counts = {}
        for name in (subjects.TASKS_STREAM, subjects.SCHED_STREAM, subjects.WORK_STREAM, subjects.EVENTS_STREAM, subjects.DLQ_STREAM):
            state = (await self.bus.js.stream_info(name)).state
            counts[name] = {"messages": state.messages, "bytes": state.bytes}
        live = await self.workers()
        return {
            "streams": counts,
            "workers": len(live),
            "running": sum(worker.running for worker in live),
            "regions": {health.region: len(health.schedulers) for health in await self.regions()},
        }

    async def workers(self) -> list[worker_registry.WorkerInfo]:
        """The live workers (their entries in KV ``workers``), by region and id."""
        return await worker_registry.live_workers(self.bus)

    async def regions(self) -> list[routing.RegionHealth]:
        """Each region as the masters' routing sees it: the configured ones first, then any
        other that a live regional scheduler serves (see :mod:`streamsched.roles.routing`)."""
        return routing.region_health(self.settings.regions, await region_registry.live_regions(self.bus))

    async def limits(self) -> tuple[list[Lane], list[KeyInUse]]:
        """The lanes that hold tasks parked by their limits (what each waits for), and the
        concurrency keys whose slots are held (see :mod:`streamsched.roles.limits`)."""
        return await limit_lanes(self.bus, self.settings), await keys_in_use(self.bus)

    async def breakers(self) -> list[Breaker]:
        """Every circuit breaker that ever opened, by region and type (see :mod:`streamsched.roles.breakers`)."""
        return await read_breakers(self.bus)

    async def open_breaker(self, task_type: str, *, region: str | None = None, for_s: float | None = None) -> list[Breaker]:
        """Force the breaker of ``task_type`` open in ``region`` (every configured region if
        None): its tasks wait on WORK, undelivered. With ``for_s`` it half-opens after that
        (and closes on a probe's success); without, it stays open until :meth:`close_breaker`."""
        regions = [region] if region is not None else list(self.settings.regions)
        return [await force(self.bus, self.settings, name, task_type, "open", for_s) for name in regions]

    async def close_breaker(self, task_type: str, *, region: str | None = None) -> list[Breaker]:
        """Force the breaker of ``task_type`` closed in ``region`` (every configured region if
        None): its tasks flow again, and the rules count its failures afresh."""
        regions = [region] if region is not None else list(self.settings.regions)
        return [await force(self.bus, self.settings, name, task_type, "closed") for name in regions]

    async def drain_worker(self, worker_id: str, *, timeout_s: float | None = None) -> worker_registry.WorkerInfo:
        """Ask a worker to drain: it fetches nothing more, finishes what it holds within its
        ``grace_s``, deregisters and exits. Returns its entry as it answered (``draining``).

        With ``timeout_s``, also waits until it has deregistered, raising :class:`TimeoutError`
        if it has not by then. Raises :class:`~streamsched.errors.NotFound` when no live
        worker has that id.
        """
        info = await worker_registry.request_drain(self.bus, worker_id)
        if timeout_s is not None and not await worker_registry.wait_gone(self.bus, worker_id, timeout_s=timeout_s):
            raise TimeoutError(f"worker {worker_id} still registered after {timeout_s}s")
        return info

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish and await the PubAck, sent again while a full stream refuses it (every
        caller's ``headers`` carry a ``Nats-Msg-Id``, kept on each try)."""
        await overload.publish(self.bus, subject, body, headers, self.settings.submit_retry_budget_s)

    async def _submit(self, subject: str, body: bytes, msg_id: str, attributes: tracing.Attributes) -> None:
        """:meth:`_publish` of a submission: with tracing on, under a ``submit`` span, the root of
        the trace its task (or workflow, or batch) runs in, whose ``traceparent`` travels with it."""
        headers = {subjects.H_MSG_ID: msg_id}
        if not tracing.ENABLED:
            await self._publish(subject, body, headers)
            return
        with tracing.producing("submit", attributes, headers):
            await self._publish(subject, body, headers)

    async def _while_full(self, step: Callable[[], Awaitable[T]]) -> T:
        """``step`` (a schedule's writes to TIMERS and KV, each safe to repeat), again while
        the server's storage is full; those streams have no limit of their own."""
        return await overload.retry_while_full(self.bus, self.settings.submit_retry_budget_s, step, None)

    def submit_subject(self, priorities: Iterable[str | None]) -> str:
        """Where a message holding tasks of ``priorities`` goes: ``tasks.submit.<p>`` when they
        are all of one priority ``p`` that the settings list, else plain ``tasks.submit``."""
        found = set(priorities)
        return subjects.submit_for(found.pop(), self.settings.priorities) if len(found) == 1 else subjects.SUBMIT

    async def _submit_batch(self, submissions: list[tuple[str, bytes]], subject: str) -> list[TaskHandle]:
        if len(submissions) > batches.MAX_TASKS:
            raise ValueError(f"an atomic batch holds at most {batches.MAX_TASKS} tasks, not {len(submissions)}")
        for index, (task_id, body) in enumerate(submissions):
            try:
                check_fields(decode_submission(body, max_bytes=self.settings.max_payload_bytes), self.settings)
            except Rejected as exc:  # the master would reject the batch naming it: say so now
                raise Rejected(f"batch rejected: task {index} (id {task_id!r}) is invalid: {exc}") from None
        batch_id = new_task_id()
        message = b'{"id":"%s","batch":[%s]}' % (batch_id.encode(), b",".join(body for _, body in submissions))
        await self._submit(subject, message, batch_id, {"streamsched.batch.id": batch_id, "streamsched.batch.tasks": len(submissions)})
        return [TaskHandle(self, task_id) for task_id, _ in submissions]

    async def get(self, task_id: str) -> TaskState | None:
        """The task's latest state, or ``None`` if the projection has not seen it (yet), or
        the id cannot be a task's."""
        if not subjects.is_token(task_id):
            return None
        found = await self.store.get(task_id)
        return found[0] if found else None

    async def wait(self, task_id: str, *, timeout_s: float = 60.0) -> TaskState:
        """Wait until the task reaches a final status (succeeded, failed, dead, rejected, cancelled).

        Watches the task's key in KV ``tasks``: the projector writes a final state within
        a few milliseconds of its event (``projector.COALESCE_S``), or later while it
        catches up with a burst. (EVENTS has no subject per task to follow: a message
        holds the events of many tasks.)
        """
        watcher = await self.store.kv.watch(subjects.state_key(task_id))
        state: TaskState | None = None
        try:
            with anyio.fail_after(timeout_s):
                while True:
                    entry = await watcher.updates(timeout=None)
                    if entry is None or not getattr(entry, "value", None):  # end of the initial values; a delete
                        continue
                    state = state_decoder.decode(entry.value)
                    if is_final(state):
                        return state
        except TimeoutError:
            if state is None:
                raise NotFound(f"no task {task_id} after {timeout_s}s") from None
            raise TimeoutError(f"task {task_id} still {state.status.value} after {timeout_s}s") from None
        finally:
            await watcher.stop()


class Workflow:
    """A DAG of tasks built in Python, submitted in one message with :meth:`Client.submit_workflow`::

        wf = Workflow("nightly")
        a = wf.task("extract", {"day": "2024-05-01"})
        b = wf.task("transform", depends_on=[a])
        wf.task("load", depends_on=[a, b])
        await client.submit_workflow(wf)

    :meth:`task` returns the task's id inside the workflow (``id``, or one made from its
    type); it runs as ``<workflow id>-<that id>``.
    """

    def __init__(self, id: str) -> None:
        self.id = id
        self.tasks: list[dict[str, Any]] = []
        self._ids: set[str] = set()

    def task(self, type: str, payload: Any = None, *, id: str | None = None, depends_on: Sequence[str] = (), **fields: Any) -> str:
        """Add a task (``fields``: any other envelope field by name); returns its id in the workflow."""
        local = id or self._id_from(type)
        if local in self._ids:
            raise ValueError(f"workflow {self.id} already has a task {local!r}")
        self._ids.add(local)
        self.tasks.append({"id": local, "type": type, "payload": payload, "depends_on": list(depends_on), **fields})
        return local

    def _id_from(self, type: str) -> str:
        base = "".join(c if c.isalnum() or c in "_-" else "_" for c in type)[:100] or "task"
        local, n = base, 1
        while local in self._ids:
            n += 1
            local = f"{base}-{n}"
        return local

    def task_id(self, local_id: str) -> str:
        """The id a task of this workflow runs under."""
        return global_id(self.id, local_id)

    def spec(self) -> dict[str, Any]:
        """The ``workflow`` object of the submission."""
        return {"id": self.id, "tasks": self.tasks}


class WorkflowHandle:
    """A submitted workflow: ask for its state, or wait for it to finish."""

    def __init__(self, client: Client, workflow_id: str) -> None:
        self.client = client
        self.id = workflow_id

    async def state(self) -> WorkflowState | None:
        return await self.client.get_workflow(self.id)

    async def wait(self, timeout_s: float = 60.0) -> WorkflowState:
        return await self.client.wait_workflow(self.id, timeout_s=timeout_s)

    def task_id(self, local_id: str) -> str:
        return global_id(self.id, local_id)

    def __repr__(self) -> str:
        return f"WorkflowHandle({self.id!r})"
