"""The worker: fetches tasks of one region from WORK, runs their handlers, records the outcome.

Life of one delivery:

1. The :class:`~streamsched.transport.pull.Puller` hands over messages from the WORK
   durables of the types this worker has handlers for (one per type and priority, which
   every worker of the region loading that type shares), so it never takes a task it
   cannot run; highest priority first, up to ``concurrency`` handler slots plus ``prefetch`` more. A message that finds
   every slot busy waits here (its ack_wait kept alive like a running task's) and starts,
   highest priority first, when a slot frees: so the next task is already here when a
   handler returns, instead of a pull request's round trip away. ``prefetch`` 0 leaves
   every task in the stream until a slot is free (for long tasks and many workers).
2. The handler runs (sync ones in a thread) under its per-attempt timeout, while one
   heartbeat loop sends ``in_progress`` for every running task so a long task is not
   redelivered while its worker is alive. ``started`` is recorded once the task has
   run for :data:`STARTED_HOLD_S`; a task that ends sooner records it with its outcome
   (as Temporal records an activity's start). Events go to ``events.worker``, those of
   the tasks that ended in one loop tick in one message.
3. The handler's slot is free as soon as it returns: the next task starts while this
   one's outcome is recorded (and published) and then the message is settled. Up to
   ``worker_finish_window`` outcomes are on their way at once; past that, the worker
   fetches nothing more until one lands, so it holds at most ``concurrency + prefetch +
   worker_finish_window`` un-acked messages. A slot held until the ack would bound a
   worker by round trips rather than by its handlers (16 slots of no-op tasks ran at
   0.72 x the raw two-hop pipeline).

   ============================  ==========================  ========================
   outcome                       published                   then
   ============================  ==========================  ========================
   returned                      ``succeeded`` + result      ack
   raised, attempts left         ``retrying``                nak with backoff delay
   raised, attempts exhausted    DLQ message + ``dead``      term
   raised :class:`Fail`          ``failed``                  term
   ============================  ==========================  ========================

The attempt number is JetStream's delivery count, so an attempt that died with its
worker (SIGKILL) still counts, and a task redelivered past ``max_attempts`` is
dead-lettered without running again.

Cancellation (:mod:`streamsched.roles.cancels`): a task whose id is in KV ``cancels`` is not
started; it is recorded ``cancelled`` and termed. A running one is cancelled when its id
appears: an async handler's asyncio task is cancelled (it may catch
:class:`asyncio.CancelledError` to clean up), a sync handler sees
``current_task().cancelled`` turn True at its next check (a thread cannot be interrupted).
Whatever the handler then does, the attempt ends ``cancelled`` (with its result, if it
returned one), is not retried, and is termed. Handlers report progress through
:mod:`streamsched.roles.progress`.

On shutdown (a signal, or ``streamsched workers drain``) the worker stops asking for
messages, naks any that still arrive, gives running and waiting tasks ``grace_s`` to finish
(a waiting task handed back would count a delivery it never ran), then cancels and naks the
rest. While it runs, its entry in KV ``workers`` says who it is and how busy
(:mod:`streamsched.roles.worker_registry`); it deletes the entry once it has drained.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import itertools
import logging
import os
import random
import time
import traceback
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
from nats.js.kv import KeyValue

from .. import logs, subjects, tracing
from ..config import PREFETCH_PER_SLOT, Settings
from ..errors import Fail, Rejected, Retry, TaskTimeout
from ..eventlog import events as ev
from ..eventlog.recorder import Recording
from ..model import decode_submission
from ..registry import Registry, TaskContext, TaskDef, _current
from ..transport import streams, wire
from ..transport.answering import when_answered
from ..transport.bus import (
    ACK,
    Bus,
    Pending,
    nak_with_delay,
    term_with_reason,
)
from ..transport.pull import Puller
from ..transport.wire import Delivery
from . import limits
from .batching import Batches
from .cancels import CancelWatch
from .metrics import Buckets
from .progress import ProgressReports
from .reprioritize import Override, PriorityOverrides, moved_headers
from .settle import Publication, Settler
from .threads import HandlerThreads
from .worker_registry import Presence, worker_id

log = logging.getLogger("streamsched.worker")

#: Longest error text kept in events and the DLQ.
MAX_ERROR_CHARS = 2000
#: Every this many starts of a waiting task, a lower level (in rotation) goes first.
SHARE_EVERY = 8
#: Nak with no delay: hand a cancelled task to another worker at once (after unsubscribing).
NAK_NOW = b"-NAK"
#: The header of the slots a task admitted past its concurrency key holds, as it is found in a raw header block.
_SLOTS = subjects.H_SLOTS.encode()
#: Nak for a message that arrives while the worker stops.
NAK_WHILE_DRAINING = nak_with_delay(0.5)
#: A task running longer than this gets its ``started`` event on its own; quicker ones
#: publish it with their outcome. Its ``at`` is the start either way.
STARTED_HOLD_S = 0.1
#: Workers made in this process so far (numbers their ids after the first).
_WORKERS_MADE = itertools.count(1)


class _Running:
    __slots__ = ("asynchronous", "began", "cancel_reason", "cancelled", "msg", "started", "started_recording", "task", "task_id")

    def __init__(self, msg: Delivery, task: asyncio.Task[Any] | None, started: ev.Started, asynchronous: bool) -> None:
        self.msg = msg
        self.task = task
        self.task_id = started.task_id
        self.asynchronous = asynchronous  # its handler runs on the loop, so it can be cancelled
        self.cancel_reason: str | None = None  # set when the task is cancelled while it runs
        self.began = time.monotonic()
        self.started: ev.Started | None = started  # None once published
        self.started_recording: Recording | None = None  # its events message, once sent on its own
        self.cancelled = False  # by the drain, past the grace period

    def unpublished(self) -> list[ev.Event]:
        """``[started]`` if it has not gone out on its own: it goes with the outcome."""
        return [self.started] if self.started is not None else []

    def landing(self) -> list[Recording]:
        """What the settle must also wait for: the events message of ``started`` sent on its own."""
        return [self.started_recording] if self.started_recording is not None else []


class Worker:
    """Runs handlers of one region, at most ``concurrency`` of them at a time, with up to
    ``prefetch`` more tasks waiting here for a slot (default: :data:`PREFETCH_PER_SLOT` per slot)."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        registry: Registry,
        *,
        region: str,
        concurrency: int,
        prefetch: int | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.registry = registry
        self.region = region
        self.concurrency = concurrency
        # A second worker of one process gets a number: each its own registry entry.
        self.id = worker_id(os.getpid(), next(_WORKERS_MADE))
        self.types = registry.names()
        if not self.types:
            raise ValueError("a worker needs at least one @task handler")
        # One durable per priority and type (highest priority first): the worker fetches
        # only the types it has handlers for. Its levels of one priority share that rank.
        consumers = [subjects.work_consumer(region, p, t) for p in settings.priorities for t in self.types]
        self._priority_of = [level for level in range(len(settings.priorities)) for _ in self.types]
        self.prefetch = PREFETCH_PER_SLOT * concurrency if prefetch is None else prefetch
        self.puller = Puller(bus, subjects.WORK_STREAM, consumers, concurrency + self.prefetch, self._on_message, ranks=self._priority_of)
        self.settler = Settler(bus, self.puller, source="worker", partitions=settings.projector_partitions)
        self.threads = HandlerThreads(concurrency)
        self.running: dict[int, _Running] = {}
        self._waiting: list[collections.deque[Delivery]] = [collections.deque() for _ in settings.priorities]
        self._picks = 0  # of waiting messages, to give lower levels their share
        self._cancelling = False  # the drain's grace period is over: start nothing more
        self.finish_window = settings.worker_finish_window
        self.finishing = 0  # outcomes being recorded and acked
        self._deferred_releases = 0  # credit kept back while finish_window outcomes are on their way
        self._tasks: set[asyncio.Task[None]] = set()  # one per delivery, plain asyncio (cheaper than anyio's)
        self.counts = {"succeeded": 0, "retrying": 0, "failed": 0, "dead": 0, "cancelled": 0}
        #: Attempts finished since start by type, then outcome (not cancelled): the masters'
        #: circuit breakers read them from the registry entry (:mod:`streamsched.roles.breakers`).
        self.outcomes: dict[str, dict[str, int]] = {}
        #: Handler run times of the tasks that succeeded, by type (this process's ``/metrics``).
        self.durations: dict[str, Buckets] = {}
        self.cancels = CancelWatch(bus, self._cancel_running)
        self.priorities = PriorityOverrides(bus)
        self.progress: ProgressReports | None = None
        self.batches: dict[str, Batches] = {}  # of batch handlers, made at their first task
        self._draining = False
        self.ready = anyio.Event()
        """Set once it is registered with its durables made: it takes tasks from then on."""
        self._idle = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        # Given explicitly where asyncio would look it up: on Python 3.11 each lookup of
        # the running loop costs a getpid() system call (about three per task here).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.presence = Presence(bus, settings, self)  # its entry in KV workers, its drain subject
        self._limits: KeyValue | None = None  # KV limits, once a task that held a slot finished
        self._freeing: set[asyncio.Task[None]] = set()  # deletes of such slots (referenced: the loop keeps tasks weakly)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        log.info(
            "worker %s: region %s, concurrency %d, handlers %s",
            self.id,
            self.region,
            self.concurrency,
            ", ".join(self.registry.names()) or "(none)",
        )
        self.progress = ProgressReports(self._loop, self._record_progress, self._is_running)
        await when_answered(lambda: streams.ensure_work_consumers(self.bus, self.settings, self.region, self.types), "for the WORK durables")
        await self.cancels.start()
        await self.priorities.start()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._heartbeat)
            tg.start_soon(self.presence.run)
            tg.start_soon(self._announce_started)
            await self.presence.registered.wait()  # the regional schedulers now know its types
            self.ready.set()
            await self.puller.run()  # returns once shutdown() stopped it
            # Drop interest at once: the server then skips this worker's open pull requests,
            # so nothing more arrives here to be nak'ed (each nak would count as an attempt).
            await self.puller.unsubscribe()
            await self._drain()
            self.threads.close()
            await self.cancels.stop()
            await self.priorities.stop()
            tg.cancel_scope.cancel()
        log.info("worker %s stopped: %s", self.id, ", ".join(f"{k} {v}" for k, v in self.counts.items()))

    async def shutdown(self) -> None:
        """Stop fetching; :meth:`run` then drains and returns."""
        self._draining = True
        self.puller.stop()
        await self.presence.draining()

    def load(self) -> tuple[int, int]:
        """Tasks in handlers now, and tasks waiting here for a slot (for the registry's heartbeats)."""
        return len(self._tasks), sum(map(len, self._waiting))

    async def _drain(self) -> None:
        self._draining = True
        if self._tasks or any(self._waiting):
            log.info(
                "draining %d running and %d waiting task(s), up to %.0fs",
                len(self._tasks),
                sum(map(len, self._waiting)),
                self.settings.grace_s,
            )
            self._idle = anyio.Event()
            with anyio.move_on_after(self.settings.grace_s):
                await self._idle.wait()
            # Past the grace period: what still waits goes back at once, to another worker.
            self._cancelling = True
            for queue in self._waiting:
                while queue:
                    self.settler.settle(queue.popleft(), NAK_NOW)
            for running in list(self.running.values()):
                if running.task is not None:
                    running.cancelled = True
                    running.task.cancel()
            with anyio.move_on_after(5):
                while self.running:
                    await anyio.sleep(0.01)
        # Let the last outcomes land and acks and naks go out before the connection is drained.
        with anyio.move_on_after(5):
            while self.puller.held > 0 or self.finishing > 0:
                await anyio.sleep(0.01)

    def _on_message(self, index: int, msg: Delivery) -> None:
        level = self._priority_of[index]
        if self._draining or self._tg is None:
            # Arrived while stopping: hand it back, with a delay so it cannot bounce back here.
            self.settler.settle(msg, NAK_WHILE_DRAINING)
            return
        if len(self._tasks) < self.concurrency:  # a handler slot is free
            self._start(level, msg)
        else:
            self._waiting[level].append(msg)

    def _start(self, level: int, msg: Delivery) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._execute(level, msg))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A handler slot is free: start the next waiting task, highest level first (every
        :data:`SHARE_EVERY`-th pick from a lower level, in rotation, so a flood of high tasks
        cannot keep a waiting lower one here for ever)."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("running a task failed; ack_wait brings it back", exc_info=task.exception())
        if not self._cancelling and (level := self._next_waiting()) is not None:
            self._start(level, self._waiting[level].popleft())
        elif not self._tasks and not any(self._waiting):
            # Idle only when no task is left at all: one just started is not in `running`
            # until its first step.
            self._idle.set()

    def _next_waiting(self) -> int | None:
        """The level whose waiting task starts next: the highest with one, except that every
        :data:`SHARE_EVERY`-th pick starts from a lower level, in rotation."""
        waiting = self._waiting
        levels = len(waiting)
        first = 0
        self._picks += 1
        if self._picks % SHARE_EVERY == 0 and levels > 1:
            first = 1 + (self._picks // SHARE_EVERY) % (levels - 1)
        for offset in range(levels):
            level = (first + offset) % levels
            if waiting[level]:
                return level
        return None

    def _held(self) -> list[Delivery]:
        """Every message this worker holds un-acked before its outcome: running or waiting."""
        return [running.msg for running in self.running.values()] + [msg for queue in self._waiting for msg in queue]

    async def _heartbeat(self) -> None:
        """One loop keeps every task held here alive (running, or waiting for a slot):
        ``+WPI`` resets its ack_wait timer."""
        interval = max(0.1, self.settings.ack_wait_s / 3)
        while True:
            await anyio.sleep(interval)
            for msg in self._held():
                try:
                    self.bus.send(msg.reply, b"+WPI")
                except Exception as exc:  # noqa: BLE001 - disconnected: try again next beat
                    log.debug("heartbeat not sent: %r", exc)

    async def _announce_started(self) -> None:
        """Publish ``started`` of every task that has run for :data:`STARTED_HOLD_S`."""
        recorder = self.settler.recorder
        assert recorder is not None, "the worker's settler records events"
        while True:
            await anyio.sleep(STARTED_HOLD_S / 2)
            cutoff = time.monotonic() - STARTED_HOLD_S
            for running in list(self.running.values()):
                if running.started is not None and running.began <= cutoff:
                    started, running.started = running.started, None
                    running.started_recording = recorder.record((started,))

    async def _execute(self, level: int, msg: Delivery) -> None:
        # The few headers used, looked up in the raw block: parsing all of it into a dict
        # costs 6 % of this role's CPU.
        raw = msg.raw_headers or b""
        task_id = wire.header_value(raw, subjects.H_TASK_ID)
        task_type = wire.header_value(raw, subjects.H_TYPE) or ""
        if task_id is None or not subjects.is_token(task_id):
            # Not from a master (which sends only valid ids): nothing to record it under, and
            # no subject to dead-letter it on. Its submission, if any, is in TASKS.
            fields = logs.task(task_id or "", task_type)
            log.error("WORK message on %s without a valid %s (%r); terminating it", msg.subject, subjects.H_TASK_ID, task_id, extra=fields)
            self.settler.settle(msg, term_with_reason("missing or invalid task id header"))
            return
        attempt = msg.num_delivered
        cancelled = self.cancels.ids
        if cancelled and task_id in cancelled:  # nothing but a truth test while no task is cancelled
            reason = cancelled[task_id]
            self._cancelled(msg, ev.Cancelled(task_id=task_id, at=time.time(), attempt=attempt, region=self.region, worker=self.id, reason=reason))
            return
        overrides = self.priorities.overrides
        if overrides and task_id in overrides:  # nothing but a truth test while no task was reprioritized
            override = overrides[task_id]
            if override.generation > (_int(wire.header_value(raw, subjects.H_GENERATION)) or 0):
                self._move(msg, raw, task_id, task_type, override, attempt)
                return
            # A moved copy counts on from the attempts its task had used before the move.
            attempt += _int(wire.header_value(raw, subjects.H_ATTEMPTS_BEFORE)) or 0
        trace = ""
        if tracing.ENABLED:  # the attempt's span: ended, and its events stamped, by _finish
            trace = tracing.begin_attempt(wire.header_value(raw, tracing.TRACEPARENT), task_id, task_type, attempt, self.region, self.id)
        definition = self.registry.get(task_type)
        max_attempts = _int(wire.header_value(raw, subjects.H_MAX_ATTEMPTS)) or (
            definition.max_attempts if definition and definition.max_attempts else self.settings.default_max_attempts
        )
        if attempt > max_attempts:
            lost = f"attempt {attempt} of {max_attempts}: earlier attempts ended without an outcome (worker lost?)"
            await self._dead(msg, task_id, task_type, attempt, lost)
            return
        if (past := _past_deadline(raw, 0.0)) is not None:
            await self._dead(msg, task_id, task_type, attempt, past)
            return

        started = ev.Started(task_id=task_id, at=time.time(), attempt=attempt, region=self.region, worker=self.id, trace=trace)
        context = TaskContext(
            id=task_id,
            type=task_type,
            attempt=attempt,
            max_attempts=max_attempts,
            priority=self.settings.priorities[level],
            region=self.region,
            worker=self.id,
            controls=self,
        )
        running = _Running(msg, asyncio.current_task(self._loop), started, definition is not None and definition.is_async)
        self.running[id(msg)] = running
        begin = running.began
        error: BaseException | None = None
        result: Any = None
        try:
            if definition is None:
                raise LookupError(f"no handler for task type {task_type!r} on worker {self.id}")
            timeout = _float(wire.header_value(raw, subjects.H_TIMEOUT)) or definition.timeout_s
            result = await self._call(definition, msg.data, context, timeout)
        except asyncio.CancelledError as exc:
            if running.cancelled:  # drained past the grace period: another worker takes it
                if trace:
                    tracing.end_attempt("handed back")
                self.settler.settle(msg, NAK_NOW)
                return
            if running.task is not None and running.task.cancelling() and running.cancel_reason is None:
                raise
            error = exc  # raised by the handler itself (an inner task it awaited was cancelled), or a cancel
        except Exception as exc:  # noqa: BLE001 - every handler error is an outcome
            error = exc
        finally:
            del self.running[id(msg)]
        if running.cancel_reason is not None:
            self._cancelled_while_running(running, attempt, result if error is None else msgspec.UNSET)
            return

        if error is None:
            try:
                encoded = msgspec.json.encode(result)
            except Exception as exc:  # noqa: BLE001 - TypeError, EncodeError, RecursionError: the handler's result is at fault
                error = Fail(f"result is not JSON-serialisable: {exc!r}")
            else:
                if len(encoded) > self.settings.max_payload_bytes:
                    error = Fail(f"result is {len(encoded)} bytes, over the limit of {self.settings.max_payload_bytes}")
            if error is None:
                done = ev.Succeeded(
                    task_id=task_id,
                    at=time.time(),
                    attempt=attempt,
                    region=self.region,
                    worker=self.id,
                    result=msgspec.Raw(encoded),
                    duration_s=time.monotonic() - begin,
                )
                self._count(task_type, "succeeded")
                durations = self.durations.get(task_type)
                if durations is None:
                    durations = self.durations[task_type] = Buckets()
                durations.observe(done.duration_s)
                self._finish(msg, [], (*running.unpublished(), done), ACK, running.landing())
                return
        await self._failed(running, task_id, task_type, attempt, max_attempts, error)

    def _cancel_running(self, task_id: str, reason: str) -> None:
        """A task was cancelled: stop it if it runs here (the watch calls this for each new id)."""
        for running in self.running.values():
            if running.task_id == task_id and running.cancel_reason is None:
                running.cancel_reason = reason
                if running.asynchronous and running.task is not None:
                    running.task.cancel()  # a sync handler sees current_task().cancelled instead

    def _cancelled_while_running(self, running: _Running, attempt: int, result: Any) -> None:
        if running.task is not None and running.task.cancelling():
            running.task.uncancel()  # the cancel was ours, and is handled here
        encoded: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
        if result is not msgspec.UNSET:
            try:
                encoded = msgspec.Raw(msgspec.json.encode(result))
            except Exception:  # noqa: BLE001 - a result that cannot be kept is dropped
                encoded = msgspec.UNSET
        reason = running.cancel_reason or ""
        log.info("task %s cancelled while running: %s", running.task_id, reason or "(no reason)", extra=logs.task(running.task_id, attempt=attempt))
        cancelled = ev.Cancelled(
            task_id=running.task_id, at=time.time(), attempt=attempt, region=self.region, worker=self.id, reason=reason, result=encoded
        )
        self._cancelled(running.msg, cancelled, running.unpublished(), running.landing())

    def _move(self, msg: Delivery, raw: bytes, task_id: str, task_type: str, override: Override, attempt: int) -> None:
        """Hand a task reprioritized after this copy was made to its new priority instead of
        running it (see :mod:`streamsched.roles.reprioritize`): the copy, then the ack. This
        delivery was no attempt: the copy carries the attempts used before it."""
        priority = override.priority
        log.info("task %s moves to priority %s (reprioritized) instead of running here", task_id, priority, extra=logs.task(task_id, task_type))
        before = (_int(wire.header_value(raw, subjects.H_ATTEMPTS_BEFORE)) or 0) + attempt - 1
        headers = wire.with_header(moved_headers(raw, task_id, override.priority, override.generation), subjects.H_ATTEMPTS_BEFORE, str(before))
        moved = (subjects.work(self.region, override.priority, task_type), msg.data, headers)
        self._finish(msg, [moved], (), ACK, (), moved=True)  # its slots go with the copy

    def _count(self, task_type: str, outcome: str) -> None:
        """One finished attempt, in :attr:`counts` and :attr:`outcomes`."""
        self.counts[outcome] += 1
        by_type = self.outcomes.get(task_type)
        if by_type is None:
            by_type = self.outcomes[task_type] = {}
        by_type[outcome] = by_type.get(outcome, 0) + 1

    def _cancelled(self, msg: Delivery, cancelled: ev.Cancelled, before: Sequence[ev.Event] = (), extra: Sequence[Pending] = ()) -> None:
        """Record ``cancelled`` and term the task off WORK: it is not retried."""
        self.counts["cancelled"] += 1
        self._finish(msg, [], (*before, cancelled), term_with_reason("cancelled"), extra)

    # TaskControls, for the handlers' current_task()

    def is_cancelled(self, task_id: str) -> bool:
        return task_id in self.cancels.ids

    def report_progress(self, context: TaskContext, fraction: float | None, message: str) -> None:
        assert self.progress is not None, "progress is reported by running tasks only"
        self.progress.report(context, fraction, message)

    def _record_progress(self, event: ev.Event) -> None:
        recorder = self.settler.recorder
        assert recorder is not None, "the worker's settler records events"
        recorder.record((event,))

    def _is_running(self, task_id: str) -> bool:
        return any(running.task_id == task_id for running in self.running.values())

    async def _failed(
        self,
        running: _Running,
        task_id: str,
        task_type: str,
        attempt: int,
        max_attempts: int,
        error: BaseException,
    ) -> None:
        msg, before, extra = running.msg, running.unpublished(), running.landing()
        text = _describe(error)
        if isinstance(error, Fail):
            log.warning("task %s (%s) failed permanently: %s", task_id, task_type, text, extra=logs.task(task_id, task_type, attempt))
            failed = ev.Failed(task_id=task_id, at=time.time(), attempt=attempt, region=self.region, worker=self.id, error=text)
            self._count(task_type, "failed")
            self._finish(msg, [], (*before, failed), term_with_reason(text), extra)
            return
        if attempt >= max_attempts:
            await self._dead(msg, task_id, task_type, attempt, text, before, extra)
            return
        delay = error.delay_s if isinstance(error, Retry) and error.delay_s is not None else self.backoff(attempt)
        if (past := _past_deadline(msg.raw_headers or b"", delay)) is not None:
            await self._dead(msg, task_id, task_type, attempt, f"{past} (last error: {text})", before, extra)
            return
        log.info(
            "task %s (%s) attempt %d/%d failed, retry in %.2fs: %s",
            task_id,
            task_type,
            attempt,
            max_attempts,
            delay,
            text,
            extra=logs.task(task_id, task_type, attempt),
        )
        retrying = ev.Retrying(
            task_id=task_id,
            at=time.time(),
            attempt=attempt,
            region=self.region,
            worker=self.id,
            error=text,
            delay_s=delay,
        )
        self._count(task_type, "retrying")
        self._finish(msg, [], (*before, retrying), nak_with_delay(delay), extra)

    async def _dead(
        self,
        msg: Delivery,
        task_id: str,
        task_type: str,
        attempt: int,
        error: str,
        before: Sequence[ev.Event] = (),
        extra: Sequence[Any] = (),
    ) -> None:
        """Keep the task and its last error on DLQ, record ``dead``, then term it off WORK."""
        log.warning("task %s (%s) is dead after %d attempt(s): %s", task_id, task_type, attempt, error, extra=logs.task(task_id, task_type, attempt))
        dlq_headers = {
            subjects.H_MSG_ID: subjects.msg_id(task_id, "dlq", attempt),
            subjects.H_TASK_ID: task_id,
            subjects.H_TYPE: task_type,
            subjects.H_ATTEMPTS: str(attempt),
            subjects.H_ERROR: " ".join(error.split())[:1024],
        }
        dead = ev.Dead(task_id=task_id, at=time.time(), attempt=attempt, region=self.region, worker=self.id, error=error)
        self._count(task_type, "dead")
        self._finish(msg, [(subjects.dlq(task_id), msg.data, dlq_headers)], (*before, dead), term_with_reason("dead: attempts exhausted"), extra)

    def _finish(
        self,
        msg: Delivery,
        publishes: Sequence[Publication],
        events: Sequence[ev.Event],
        reply: bytes,
        also: Sequence[Pending],
        *,
        moved: bool = False,
    ) -> None:
        """Publish the outcome, then settle ``msg``; its handler slot is free from now on.
        A final outcome of a task that holds slots of a concurrency key frees them too
        (not a retry, nor a move to another priority, whose copy holds them on).

        Its credit goes back to the puller at once while fewer than ``finish_window``
        outcomes are on their way, else when one of them has landed (:meth:`_finished`):
        until then the worker fetches nothing more.
        """
        self.finishing += 1
        if self.finishing <= self.finish_window:
            self.puller.release()
        else:
            self._deferred_releases += 1
        if tracing.ENABLED and (trace := tracing.end_attempt(_outcome(events), getattr(events[-1], "error", "") if events else "")):
            events = tracing.stamped(events, trace)
        landed = None
        raw = msg.raw_headers
        if raw and _SLOTS in raw and not moved and not reply.startswith(b"-NAK"):
            landed = functools.partial(self._free_slots, wire.header_value(raw, subjects.H_SLOTS) or "")
        self.settler.forward(msg, publishes, events=events, reply=reply, also=also, settled=self._finished, landed=landed)

    def _finished(self) -> None:
        """An outcome landed and its message was settled: room for one more on its way."""
        self.finishing -= 1
        if self._deferred_releases:
            self._deferred_releases -= 1
            self.puller.release()

    def _free_slots(self, slots: str) -> None:
        """A final outcome of a task that held slots of a concurrency key landed: free them."""
        assert self._loop is not None
        task = self._loop.create_task(self._free(slots))
        self._freeing.add(task)
        task.add_done_callback(self._freeing.discard)

    async def _free(self, slots: str) -> None:
        if self._limits is None:
            self._limits = await self.bus.js.key_value(subjects.LIMITS_BUCKET)
        await limits.release(self._limits, slots)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with ±20% jitter, capped at ``retry_max_s``."""
        base = min(self.settings.retry_max_s, self.settings.retry_base_s * 2.0 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)

    async def _call(self, definition: TaskDef, body: bytes, context: TaskContext, timeout: float | None) -> Any:
        try:
            submission = decode_submission(body)  # the master's decode (its size limit aside)
        except Rejected as exc:
            raise Fail(f"task body: {exc}") from None
        payload = submission.payload
        if submission.dependency_results is not None:  # a released dependant: its results ride in the body
            context = msgspec.structs.replace(context, dependency_results=submission.dependency_results)
        if definition.batch_size is not None:
            return await self._batch_of(definition).run(payload, context)
        token = _current.set(context)
        try:
            if definition.is_async:
                if timeout is None:
                    return await definition.fn(payload)
                async with asyncio.timeout(timeout):
                    return await definition.fn(payload)
            return await self.threads.run(functools.partial(definition.fn, payload), timeout, TaskTimeout)
        except TimeoutError:
            raise TaskTimeout(f"attempt timed out after {timeout}s") from None
        finally:
            _current.reset(token)

    def _batch_of(self, definition: TaskDef) -> Batches:
        batches = self.batches.get(definition.name)
        if batches is None:
            assert self._loop is not None
            batches = self.batches[definition.name] = Batches(definition, self.threads, self._loop, self.concurrency)
        return batches


def _past_deadline(raw: bytes, delay_s: float) -> str | None:
    """The reason a task ends ``dead`` when an attempt starting ``delay_s`` from now would
    start past its deadline; ``None`` when it has none (a header lookup) or is in time."""
    deadline = _float(wire.header_value(raw, subjects.H_DEADLINE))
    if deadline is None or time.time() + delay_s <= deadline:
        return None
    at = datetime.datetime.fromtimestamp(deadline, datetime.UTC).isoformat(timespec="milliseconds")
    return f"deadline: no attempt starts after {at}" if delay_s == 0 else f"deadline: a retry in {delay_s:.2f}s would start after {at}"


def _outcome(events: Sequence[ev.Event]) -> str:
    """What an attempt's events say it ended in (its last event's kind), for its span."""
    return type(events[-1]).__name__.lower() if events else "moved"


def _describe(error: BaseException) -> str:
    text = "".join(traceback.format_exception_only(error)).strip()
    return text[:MAX_ERROR_CHARS]


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
