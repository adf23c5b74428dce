"""Whole DAGs in one message: ``{"workflow": {"id": W, "tasks": [...]}}`` on ``tasks.submit``
(or ``tasks.submit.<priority>``, where each task gets that priority or must name it).

Ids in a workflow are *local*: each task names itself (``id``, required) and its
dependencies (``depends_on``) by ids inside the workflow, and runs as ``<W>-<local id>``.
So one workflow file can be submitted again under a new workflow id, and two workflows
never collide. Everything is checked before anything runs (each task as a submission, ids
unique, dependencies inside the workflow, no cycle); then the roots are placed and the
rest registered as waiting tasks (:mod:`streamsched.roles.dependencies`).

Each task carries the label :data:`WORKFLOW_LABEL` (its workflow's id). The projector
gives the statuses of the labelled tasks of each write batch to :class:`WorkflowTracker`,
which keeps KV ``workflows.<W>`` current: one compare-and-set write per workflow per
batch. The record stores each task's status rather than bare counters, so a redelivered
event folded twice counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from .. import subjects
from ..errors import Rejected
from ..model import FINAL_STATUSES, Status, Submission
from ..transport.bus import Bus

#: The label naming a task's workflow (set on every task of one).
WORKFLOW_LABEL = "streamsched/workflow"
#: Most tasks in one workflow.
MAX_TASKS = 10_000
#: Largest workflow state record (one KV value holds every task's status): well inside
#: nats-server's 1 MB message limit.
MAX_RECORD_BYTES = 800_000
#: Compare-and-set rounds on one workflow record before the batch is retried.
CAS_ROUNDS = 20
#: Statuses of a task that has not begun to run.
_NOT_STARTED = frozenset({Status.PENDING, Status.WAITING})
#: Outcomes of a task that make its workflow fail (a cancelled one only cancels it).
_FAILURES = frozenset({Status.FAILED, Status.DEAD, Status.REJECTED})


class WorkflowSpec(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The ``workflow`` object of a submission."""

    id: str
    tasks: list[dict[str, Any]]


class WorkflowState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The value of KV ``workflows.<id>``."""

    id: str
    status: str = "pending"
    """``pending`` (nothing started), ``running``, then ``succeeded`` (every task did),
    ``failed`` (any task failed, was dead or rejected) or ``cancelled`` (else)."""
    tasks: dict[str, str] = {}
    """Each task's status, by its (global) id."""
    counts: dict[str, int] = {}
    """Tasks by status."""
    submitted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None


workflow_decoder = msgspec.json.Decoder(WorkflowState)
_spec_decoder = msgspec.json.Decoder(WorkflowSpec)

#: The master's check of one task: ``(bytes, id if missing) -> submission``; raises :class:`Rejected`.
Validate = Callable[[bytes, Callable[[], str]], Submission]


def global_id(workflow_id: str, local_id: str) -> str:
    return f"{workflow_id}-{local_id}"


def parse(workflow: dict[str, Any], validate: Validate) -> tuple[str, list[Submission]]:
    """The workflow's id and its tasks as submissions (global ids), in an order where every
    task comes after its dependencies; raises :class:`Rejected` naming what is wrong."""
    try:
        spec = _spec_decoder.decode(msgspec.json.encode(workflow))
    except msgspec.DecodeError as exc:
        raise Rejected(f"not a valid workflow: {exc}") from None
    if not subjects.is_token(spec.id):
        raise Rejected(f"workflow id {spec.id!r} is not subject-safe (1-128 characters of A-Z a-z 0-9 _ -)")
    try:
        return spec.id, _checked_tasks(spec, validate)
    except Rejected as exc:
        exc.task_id = spec.id  # recorded under the workflow's id: `status W` says why
        raise


def _checked_tasks(spec: WorkflowSpec, validate: Validate) -> list[Submission]:
    if not spec.tasks:
        raise Rejected(f"workflow {spec.id} has no tasks")
    if len(spec.tasks) > MAX_TASKS:
        raise Rejected(f"workflow {spec.id} has {len(spec.tasks)} tasks, over the limit of {MAX_TASKS}")
    graph: dict[str, list[str]] = {}
    for index, task in enumerate(spec.tasks):
        local = task.get("id")
        if not isinstance(local, str):
            raise Rejected(f"workflow {spec.id}: task {index} has no `id` (each task names itself, inside the workflow)")
        if local in graph:
            raise Rejected(f"workflow {spec.id}: two tasks have the id {local!r}")
        depends_on = task.get("depends_on", [])
        if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
            raise Rejected(f"workflow {spec.id}: task {local}: `depends_on` must be a list of ids")
        graph[local] = depends_on
    for local, depends_on in graph.items():
        for dependency in depends_on:
            if dependency not in graph:
                raise Rejected(f"workflow {spec.id}: task {local} depends on {dependency!r}, which is not in the workflow")
    order = _topological(spec.id, graph)
    submissions: dict[str, Submission] = {}
    for task in spec.tasks:
        local = task["id"]
        fields = dict(task)
        fields["id"] = global_id(spec.id, local)
        fields["depends_on"] = [global_id(spec.id, d) for d in graph[local]]
        labels = fields.get("labels")
        fields["labels"] = {**(labels if isinstance(labels, dict) else {}), WORKFLOW_LABEL: spec.id}
        if fields.get("idempotency_key") is not None:
            raise Rejected(f"workflow {spec.id}: task {local}: `idempotency_key` is not taken inside a workflow (the workflow id names it)")
        try:
            submissions[local] = validate(msgspec.json.encode(fields), functools.partial(str, fields["id"]))
        except Rejected as exc:
            raise Rejected(f"workflow {spec.id}: task {local}: {exc}") from None
    record_size = sum(len(submission.id or "") + 16 for submission in submissions.values())
    if record_size > MAX_RECORD_BYTES:
        raise Rejected(
            f"workflow {spec.id}: its state record would take about {record_size} bytes, over {MAX_RECORD_BYTES} (use fewer tasks or shorter ids)"
        )
    return [submissions[local] for local in order]


def _topological(workflow_id: str, graph: dict[str, list[str]]) -> list[str]:
    """Every task after its dependencies; raises :class:`Rejected` naming a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in graph:
        if state.get(root):
            continue
        path: list[str] = [root]
        iterators = [iter(graph[root])]
        state[root] = 1
        while iterators:  # depth first, without recursion (a workflow may be a long chain)
            node = next(iterators[-1], None)
            if node is None:
                iterators.pop()
                done = path.pop()
                state[done] = 2
                order.append(done)
            elif state.get(node) == 1:
                cycle = [*path[path.index(node) :], node]
                raise Rejected(f"workflow {workflow_id} has a cycle: {' -> '.join(cycle)} (each depends on the next)")
            elif not state.get(node):
                state[node] = 1
                path.append(node)
                iterators.append(iter(graph[node]))
    return order


def summarize(record: WorkflowState) -> None:
    """Recompute ``counts`` and ``status`` from the tasks' statuses."""
    counts: dict[str, int] = {}
    for status in record.tasks.values():
        counts[status] = counts.get(status, 0) + 1
    record.counts = counts
    statuses = {Status(status) for status in counts}
    if not statuses <= FINAL_STATUSES:
        record.status = "pending" if statuses <= _NOT_STARTED else "running"
    elif statuses == {Status.SUCCEEDED}:
        record.status = "succeeded"
    else:
        record.status = "failed" if statuses & _FAILURES else "cancelled"


class WorkflowTracker:
    """Creates workflow records and keeps them current."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.js.key_value(subjects.WORKFLOWS_BUCKET)
        return self._kv

    async def create(self, workflow_id: str, task_ids: Iterable[str], now: float) -> None:
        """The workflow's record, every task pending (already there: a redelivery goes on)."""
        record = WorkflowState(id=workflow_id, tasks=dict.fromkeys(task_ids, Status.PENDING.value), submitted_at=now, updated_at=now)
        summarize(record)
        with contextlib.suppress(KeyWrongLastSequenceError):
            await (await self.kv()).create(workflow_id, msgspec.json.encode(record))

    async def update(self, changes: dict[str, dict[str, tuple[Status, float]]]) -> None:
        """Record the statuses (and when they were reached) of tasks, by workflow id."""
        if changes:
            await asyncio.gather(*(self._update_one(workflow_id, tasks) for workflow_id, tasks in changes.items()))

    async def _update_one(self, workflow_id: str, tasks: dict[str, tuple[Status, float]]) -> None:
        kv = await self.kv()
        for _ in range(CAS_ROUNDS):
            try:
                entry = await kv.get(workflow_id)
            except KeyNotFoundError:
                return  # not made by a workflow submission (a label set by hand), or expired
            if entry.value is None:
                return
            record = workflow_decoder.decode(entry.value)
            changed = False
            latest = record.updated_at or 0.0
            for task_id, (status, at) in tasks.items():
                known = record.tasks.get(task_id)
                if known is None or known == status.value or Status(known).is_final:
                    continue  # not its task, or no news (a final status never goes back)
                record.tasks[task_id] = status.value
                changed = True
                latest = max(latest, at)
                if status not in _NOT_STARTED and record.started_at is None:
                    record.started_at = at
            if not changed:
                return
            summarize(record)
            record.updated_at = latest
            if record.status in ("succeeded", "failed", "cancelled"):
                record.finished_at = latest
            try:
                await kv.update(workflow_id, msgspec.json.encode(record), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue
            return
        raise RuntimeError(f"workflow record {workflow_id} kept changing; updating it again later")

    async def get(self, workflow_id: str) -> WorkflowState | None:
        try:
            entry = await (await self.kv()).get(workflow_id)
        except KeyNotFoundError:
            return None
        return None if entry.value is None else workflow_decoder.decode(entry.value)
