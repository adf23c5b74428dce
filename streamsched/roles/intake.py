"""The master's path for submissions that need more than a hand-off to SCHED.

A plain task is routed in the master's read loop without waiting for anything
(:meth:`streamsched.roles.master.Master._route`). A submission that waits for a time or
for other tasks, fans out into chunks, names an idempotency key, or holds many tasks (a
workflow, a batch) needs a few round trips to JetStream first (KV reads and writes,
placements). Each such submission runs here as its own asyncio task; its message is
acked once everything it led to is stored (its events included), rejected with a reason
when it is invalid, and nak'ed to come back when JetStream failed. The master's window
bounds how many run at once, since each holds its submission un-acked.

Every step is safe to repeat: a redelivered submission finds its KV entries made and its
publishes deduplicated by ``Nats-Msg-Id``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import msgspec

from .. import logs, subjects, tracing
from ..config import Settings
from ..errors import Rejected
from ..eventlog import events as ev
from ..model import Submission
from ..transport.bus import Bus, nak_with_delay, stored_at_ns
from ..transport.wire import Delivery
from .batches import Gate, events_of, place_atomically, ready_tasks
from .dependencies import Dependencies
from .idempotency import admits, claim
from .placement import ReadyTask, place
from .settle import Settler
from .splits import fan_out
from .timing import ready_task
from .workflows import WorkflowTracker, parse

log = logging.getLogger("streamsched.master")

#: Tasks of one workflow or split taken in concurrently (each a few JetStream round trips).
STEPS_AT_ONCE = 256
#: Longest batch id taken as given: ``<id>-<index>`` must still be a task id.
BATCH_ID_MAX = 100


def needs_intake(submission: Submission) -> bool:
    """True when ``submission`` cannot simply be handed to SCHED (checked for every task:
    a few attribute reads)."""
    return bool(
        submission.depends_on
        or submission.run_at is not None
        or submission.delay_s is not None
        or submission.split is not None
        or submission.idempotency_key is not None
    )


class Wrapper(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A message that carries many tasks instead of being one: ``{"workflow": {...}}`` or
    ``{"batch": [...]}``. Tried only on a message that failed to decode as a task."""

    workflow: dict[str, object] | None = None
    batch: list[object] | None = None
    id: str | None = None
    """A batch's own id: its rejection is recorded under it, and its tasks without an id
    get ``<id>-<index>`` (otherwise an id derived from the message)."""


_wrapper_decoder = msgspec.json.Decoder(Wrapper)


def decode_wrapper(data: bytes) -> Wrapper | None:
    """The wrapper in ``data``, or ``None`` when it is not one (then the task's own rejection stands)."""
    try:
        wrapper = _wrapper_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    return wrapper if (wrapper.workflow is None) != (wrapper.batch is None) else None


#: Rejects a submission: ``(message, task id, reason, now)``.
Reject = Callable[[Delivery, str, str, float], None]


class Intake:
    """Runs the asynchronous steps of submissions that need them, then settles each."""

    def __init__(self, settings: Settings, bus: Bus, settler: Settler, reject: Reject, gate: Gate) -> None:
        """``gate`` (the master) checks and routes each task of a batch or workflow as the master does one."""
        self.settings = settings
        self.bus = bus
        self.settler = settler
        self.reject = reject
        self.gate = gate
        self._running: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly
        self.dependencies = Dependencies(settings, bus, source="master-deps")
        self.workflows = WorkflowTracker(bus)

    def accept(self, msg: Delivery, submission: Submission, region: str, now: float, parent: str | None = None) -> None:
        """Start the steps of one task's submission (its id is filled in, its fields checked;
        ``parent``: the trace context it came with, None while tracing is off)."""
        submitted_at = stored_at_ns(msg.reply) / 1e9  # relative times count from here, on every delivery
        self._spawn(msg, submission.id or "", self._task_steps(submission, region, now, submitted_at, msg.stream_seq), now, parent)

    def accept_wrapper(
        self, msg: Delivery, wrapper: Wrapper, fallback_id: str, now: float, priority: str | None = None, parent: str | None = None
    ) -> None:
        """Start the steps of a workflow or batch message (``priority``: the one its subject
        names, which each of its tasks gets or must name, as a task on that subject)."""
        submitted_at = stored_at_ns(msg.reply) / 1e9
        if wrapper.id is not None and subjects.is_token(wrapper.id) and len(wrapper.id) <= BATCH_ID_MAX:
            fallback_id = wrapper.id
        steps = self._wrapper_steps(wrapper, fallback_id, now, submitted_at, msg.stream_seq, priority, redelivered=msg.num_delivered > 1)
        self._spawn(msg, fallback_id, steps, now, parent)

    def _spawn(self, msg: Delivery, task_id: str, steps: Coroutine[Any, Any, list[ev.Event]], now: float, parent: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self._settle_after(msg, task_id, steps, now, parent))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _settle_after(self, msg: Delivery, task_id: str, steps: Coroutine[Any, Any, list[ev.Event]], now: float, parent: str | None) -> None:
        if parent is not None:  # the steps' tasks (and the tasks they gather) see it: each its own copy of this context
            tracing.parent.set(parent)
        try:
            events = await steps
        except Rejected as exc:
            self.reject(msg, exc.task_id or task_id, str(exc), now)
            return
        except Exception as exc:  # noqa: BLE001 - JetStream failed a step: the submission comes back
            delay = self.settler.retry_delay_s
            log.warning("submission %s not taken in yet (%r); it comes back in %.1fs", task_id, exc, delay, extra=logs.task(task_id))
            self.settler.settle(msg, nak_with_delay(self.settler.retry_delay_s))
            return
        self.settler.forward(msg, (), events=events)

    async def _task_steps(self, submission: Submission, region: str, now: float, submitted_at: float, sequence: int = 0) -> list[ev.Event]:
        """Take in one task (``sequence``: its submission's place in TASKS); returns the events that record it."""
        task_id = submission.id
        assert task_id is not None
        # Checked before a key is taken: a rejected submission must not hold it.
        task = ready_task(submission, region, submitted_at)
        trace = ""
        if (parent := tracing.parent.get()) is not None:
            trace = _task_span(task_id, submission, region, parent)
            task = msgspec.structs.replace(task, trace=trace)
            tracing.parent.set(trace)  # its chunks, if it splits, are its children
        if submission.idempotency_key is not None:
            key = submission.idempotency_key
            taken = await claim(self.bus, key, f"{task_id}@{sequence}", self.settings.idempotency_ttl_s)
            if not admits(taken, task_id, sequence):
                raise Rejected(f"duplicate of task {taken.holder} (idempotency key {key!r})")
        submitted = ev.Submitted(
            task_id=task_id,
            at=now,
            type=submission.type,
            priority=submission.priority,
            region=region,
            labels=submission.labels,
            trace=trace,
        )
        if submission.split is not None:
            return [submitted, *await self._split_steps(submission, region, now, submitted_at)]
        if submission.depends_on:
            return [submitted, *tracing.stamped(await self.dependencies.register(task, submission, now, since=submitted_at), trace)]
        await place(self.bus, [task], now=now)
        if task.is_delayed(now):
            return [submitted, ev.Waiting(task_id=task_id, at=now, region=region, until=task.run_at, trace=trace)]
        return [submitted, ev.Scheduled(task_id=task_id, at=now, region=region, priority=task.priority, trace=trace)]

    async def _wrapper_steps(
        self, wrapper: Wrapper, fallback_id: str, now: float, submitted_at: float, sequence: int, priority: str | None, *, redelivered: bool
    ) -> list[ev.Event]:
        """Take in a workflow or a batch (``sequence``: its place in TASKS); returns the events that record its tasks."""
        if wrapper.batch is not None:
            tasks = ready_tasks(wrapper.batch, self.gate, fallback_id, submitted_at, priority)
            if (parent := tracing.parent.get()) is not None:  # one trace for the batch: a span per task under its submit
                tasks = [(msgspec.structs.replace(task, trace=_batch_task_span(task, parent)), labels) for task, labels in tasks]
            # Its messages' ids name this submission, so a batch id used again is a new batch
            # while a redelivery of this one is a duplicate (stored already).
            await place_atomically(self.bus, [task for task, _ in tasks], f"{fallback_id}:{sequence}", now)
            return events_of(tasks, now)
        assert wrapper.workflow is not None
        return await self._workflow_steps(wrapper.workflow, now, submitted_at, priority, redelivered)

    async def _workflow_steps(
        self, workflow: dict[str, Any], now: float, submitted_at: float, priority: str | None, redelivered: bool
    ) -> list[ev.Event]:
        """Check the whole workflow, record it, then take in each task (roots placed, the rest waiting)."""
        workflow_id, tasks = parse(workflow, functools.partial(self.gate.validate, priority=priority))
        if (parent := tracing.parent.get()) is not None:  # one trace: a span for the workflow, one under it per task
            tracing.parent.set(tracing.hop("master workflow", parent, {"streamsched.workflow.id": workflow_id}))
            tracing.siblings.set({})
        # Every check before anything is placed: a task that would start after its deadline
        # rejects the workflow whole, as the other checks do.
        for task in tasks:
            try:
                ready_task(task, task.region or self.gate.pick_region(task.id or ""), submitted_at)
            except Rejected as exc:
                rejected = Rejected(f"workflow {workflow_id}: task {task.id}: {exc}")
                rejected.task_id = workflow_id  # recorded under the workflow's id, as its other checks
                raise rejected from None
        await self.workflows.create(workflow_id, (task.id or "" for task in tasks), now)
        # Placed again, its tasks go where they went the first time (the routing may have changed since).
        recorded = await self.gate.recorded_regions([task.id or "" for task in tasks]) if redelivered else {}
        return await self._each_task_steps(tasks, None, now, submitted_at, recorded)

    async def _split_steps(self, submission: Submission, region: str, now: float, submitted_at: float) -> list[ev.Event]:
        """Register the gather task (the submission's own id) waiting for the chunks, then take in the chunks."""
        chunks, gather, collect = fan_out(submission, self.settings)
        gathering = msgspec.structs.replace(ready_task(gather, region, submitted_at), trace=tracing.parent.get() or "")
        waiting = await self.dependencies.register(gathering, gather, now, since=submitted_at, split=True, collect=collect)
        return waiting + await self._each_task_steps(chunks, region, now, submitted_at)

    async def _each_task_steps(
        self, tasks: list[Submission], region: str | None, now: float, submitted_at: float, recorded: Mapping[str, str] | None = None
    ) -> list[ev.Event]:
        """:meth:`_task_steps` of every task, :data:`STEPS_AT_ONCE` at a time (in ``region``, or each its
        own: the one it names, the one ``recorded`` for it, or the routing's)."""
        recorded = recorded or {}

        def region_of(task: Submission) -> str:
            return region or task.region or recorded.get(task.id or "") or self.gate.pick_region(task.id or "")

        events: list[ev.Event] = []
        for start in range(0, len(tasks), STEPS_AT_ONCE):
            steps = [self._task_steps(task, region_of(task), now, submitted_at) for task in tasks[start : start + STEPS_AT_ONCE]]
            for task_events in await asyncio.gather(*steps):
                events += task_events
        return events


def _task_span(task_id: str, submission: Submission, region: str, parent: str) -> str:
    """Record the master's span of a task taken in here (a child of ``parent``, linked to the spans
    of the tasks it depends on within its workflow); its ``traceparent``."""
    siblings = tracing.siblings.get()
    links = [siblings[d] for d in submission.depends_on if d in siblings] if siblings is not None else []
    trace = tracing.hop("master", parent, tracing.task_attributes(task_id, submission.type, region=region), links)
    if siblings is not None:
        siblings[task_id] = trace
    return trace


def _batch_task_span(task: ReadyTask, parent: str) -> str:
    """Record the master's span of a task of a batch (a child of the batch's submit); its ``traceparent``."""
    return tracing.hop("master", parent, tracing.task_attributes(task.id, task.type, region=task.region))
