"""A blocking client for code without an event loop: scripts, Django and Flask views.

``with SyncClient.connect(url) as client: client.submit("echo", 1).result()``.
nats-py is asyncio-only, so the :class:`SyncClient` owns one daemon thread running an
asyncio event loop with an async :class:`~streamsched.client.Client` on it; each method
hands its coroutine to that loop (``asyncio.run_coroutine_threadsafe``) and blocks the
calling thread until the answer. One connection serves every thread of the process: calls
from several threads at once run side by side on the loop, none waits for another's
answer. Exceptions cross the thread as they are (:class:`~streamsched.errors.NotFound`,
:class:`~streamsched.errors.Rejected`, :class:`~streamsched.errors.Overloaded`...).

No call waits for ever: the async methods bound themselves (their ``timeout_s``, the
publish and API timeouts, ``submit_retry_budget_s``); on top of that, the calling thread
gives up after ``call_timeout_s`` (plus the method's own ``timeout_s``, for those that
wait) with :class:`TimeoutError`, cancelling the call, in case the loop itself is stuck.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .client import Client, TaskHandle, Workflow, WorkflowHandle
from .config import Settings
from .errors import StreamschedError
from .eventlog import dlq
from .eventlog import events as ev
from .model import DEFAULT_PRIORITY, TaskState
from .roles import routing, schedules, worker_registry
from .roles.breakers import Breaker
from .roles.limits import KeyInUse, Lane
from .roles.workflows import WorkflowState

T = TypeVar("T")

#: Default longest a call waits beyond its own ``timeout_s`` (if it has one) before the
#: calling thread gives up: well past what the async call bounds itself to (10 s publish
#: and API timeouts, ``submit_retry_budget_s``), so it only fires on a stuck loop.
CALL_TIMEOUT_S = 120.0
#: Longest :meth:`SyncClient.close` waits for the loop thread to finish.
CLOSE_TIMEOUT_S = 15.0


class _LoopThread:
    """A daemon thread running one asyncio event loop until :meth:`stop`.

    Daemon, so that a script that forgets :meth:`SyncClient.close` still exits.
    ``asyncio.run`` cancels whatever is still running on the loop when it stops, so a
    call in flight at close ends (cancelled) instead of blocking its thread.
    """

    def __init__(self, name: str) -> None:
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()

    @property
    def is_current(self) -> bool:
        """Whether the calling thread is the loop's own (where blocking on it would deadlock)."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def stop(self, timeout_s: float) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)


class SyncClient:
    """A blocking :class:`~streamsched.client.Client`, safe to share between threads.

    Build it with :meth:`connect`; use it as a context manager or call :meth:`close`. Each
    method does what the async method of the same name does (see its docstring there).
    Connect one per process: a client carried across a fork (a pre-forking server that
    imported the app first) raises :class:`RuntimeError`, its loop thread being the parent's.
    Not for async code: it would block that code's loop; use the async client there.
    """

    def __init__(self, client: Client, loop: _LoopThread, *, call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Prefer :meth:`connect`; ``client`` must live on ``loop``."""
        self._client = client
        self._loop = loop
        self._call_timeout_s = call_timeout_s
        self._lock = threading.Lock()  # a call is either handed to the loop before close, or refused
        self._closed = False
        self._pid = os.getpid()  # the loop thread does not survive a fork: a child must connect anew

    @classmethod
    def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        name: str = "streamsched-client",
        settings: Settings | None = None,
        call_timeout_s: float = CALL_TIMEOUT_S,
    ) -> SyncClient:
        """Start the loop thread and connect (:meth:`Client.connect`); raises
        :class:`~streamsched.errors.Unavailable` (and stops the thread) when NATS cannot be reached."""
        loop = _LoopThread(f"{name}-loop")
        try:
            client = loop.submit(Client.connect(url, name=name, settings=settings)).result(call_timeout_s)
        except BaseException:
            loop.stop(CLOSE_TIMEOUT_S)
            raise
        return cls(client, loop, call_timeout_s=call_timeout_s)

    @property
    def settings(self) -> Settings:
        return self._client.settings

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the loop thread; idempotent. A call still running
        in another thread ends with :class:`RuntimeError`; later calls raise it at once."""
        if self._loop.is_current:
            raise RuntimeError("a SyncClient cannot be closed from its own event loop")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pid != os.getpid():  # a forked child's copy: the connection and loop are the parent's
                return
            future = self._loop.submit(self._client.close())
        try:
            future.result(CLOSE_TIMEOUT_S)
        finally:
            self._loop.stop(CLOSE_TIMEOUT_S)

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self, coro: Coroutine[Any, Any, T], *, waits_s: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its exception), waiting
        at most ``call_timeout_s`` beyond ``waits_s``, the time the call itself may wait."""
        with self._lock:
            refusal = self._refusal()
            if refusal:
                coro.close()  # never awaited: say so quietly rather than with a warning
                raise RuntimeError(refusal)
            future = self._loop.submit(coro)
        limit = self._call_timeout_s + (waits_s or 0.0)
        try:
            return future.result(limit)
        except StreamschedError:  # an answer the call reached (NotFound, Rejected...): as it is
            raise
        except Exception as exc:
            if self._closed:  # cancelled by the close, or nats-py's draining and closed errors
                raise RuntimeError("this SyncClient was closed while the call ran") from exc
            if isinstance(exc, TimeoutError) and future.cancel():  # ours gave up, not the call (its own TimeoutError)
                raise TimeoutError(f"no answer from the client's event loop within {limit}s") from None
            raise
        except BaseException:  # KeyboardInterrupt in a script: stop the call on the loop too
            future.cancel()
            raise

    def _refusal(self) -> str:
        """Why a call cannot be handed to the loop now, or ``""``: no loop would answer it
        (closed, or left in the parent by a fork), or the caller is the loop itself (a deadlock)."""
        if self._closed:
            return "this SyncClient is closed; connect a new one"
        if self._pid != os.getpid():
            return "this SyncClient was connected in another process (before a fork): connect one in each process"
        if self._loop.is_current:
            return "a SyncClient cannot be called from its own event loop; use the async Client there"
        return ""

    def submit(
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
    ) -> SyncTaskHandle:
        """Submit a task; returns once JetStream has stored it (:meth:`Client.submit`)."""
        handle = self._run(
            self._client.submit(
                type,
                payload,
                id=id,
                priority=priority,
                region=region,
                region_failover=region_failover,
                timeout_s=timeout_s,
                max_attempts=max_attempts,
                labels=labels,
                run_at=run_at,
                delay_s=delay_s,
                deadline=deadline,
                deadline_s=deadline_s,
                idempotency_key=idempotency_key,
                depends_on=depends_on,
                dependency_timeout_s=dependency_timeout_s,
                on_dependency_failure=on_dependency_failure,
                split=split,
                concurrency_key=concurrency_key,
                concurrency_limit=concurrency_limit,
                rate_key=rate_key,
                fairness_key=fairness_key,
            )
        )
        return SyncTaskHandle(self, handle)

    def submit_many(self, tasks: Iterable[Mapping[str, Any]], *, window: int = 4000, atomic: bool = False) -> list[SyncTaskHandle]:
        """Submit many tasks at once (:meth:`Client.submit_many`). ``tasks`` is read in the
        calling thread, so a generator may use what belongs to it (a Django queryset)."""
        handles = self._run(self._client.submit_many(list(tasks), window=window, atomic=atomic))
        return [SyncTaskHandle(self, handle) for handle in handles]

    def submit_workflow(self, workflow: Workflow | Mapping[str, Any]) -> SyncWorkflowHandle:
        """Submit a whole DAG in one message (:meth:`Client.submit_workflow`)."""
        return SyncWorkflowHandle(self, self._run(self._client.submit_workflow(workflow)))

    def get(self, task_id: str) -> TaskState | None:
        """The task's latest state, or ``None`` (:meth:`Client.get`)."""
        return self._run(self._client.get(task_id))

    def wait(self, task_id: str, *, timeout_s: float = 60.0) -> TaskState:
        """Wait until the task reaches a final status (:meth:`Client.wait`)."""
        return self._run(self._client.wait(task_id, timeout_s=timeout_s), waits_s=timeout_s)

    def cancel(self, task_id: str, *, reason: str = "") -> TaskState | WorkflowState:
        """Ask for the task or workflow to be cancelled (:meth:`Client.cancel`)."""
        return self._run(self._client.cancel(task_id, reason=reason))

    def reprioritize(self, task_id: str, priority: str) -> TaskState:
        """Ask for a task that has not started to run at ``priority`` (:meth:`Client.reprioritize`)."""
        return self._run(self._client.reprioritize(task_id, priority))

    def get_workflow(self, workflow_id: str) -> WorkflowState | None:
        """The workflow's state, or ``None`` (:meth:`Client.get_workflow`)."""
        return self._run(self._client.get_workflow(workflow_id))

    def wait_workflow(self, workflow_id: str, *, timeout_s: float = 60.0, poll_s: float = 0.1) -> WorkflowState:
        """Wait until the workflow has finished (:meth:`Client.wait_workflow`)."""
        return self._run(self._client.wait_workflow(workflow_id, timeout_s=timeout_s, poll_s=poll_s), waits_s=timeout_s)

    def add_schedule(
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
        """Submit a task of ``type`` at every slot of ``cron`` (:meth:`Client.add_schedule`)."""
        return self._run(self._client.add_schedule(name, cron, type, payload, time_zone=time_zone, paused=paused, **task))

    def list_schedules(self) -> list[schedules.Schedule]:
        """Every schedule, by name (:meth:`Client.list_schedules`)."""
        return self._run(self._client.list_schedules())

    def remove_schedule(self, name: str) -> None:
        """Stop a schedule and delete it (:meth:`Client.remove_schedule`)."""
        self._run(self._client.remove_schedule(name))

    def pause_schedule(self, name: str) -> schedules.Schedule:
        """Stop making tasks until :meth:`resume_schedule` (:meth:`Client.pause_schedule`)."""
        return self._run(self._client.pause_schedule(name))

    def resume_schedule(self, name: str) -> schedules.Schedule:
        """Make tasks again (:meth:`Client.resume_schedule`)."""
        return self._run(self._client.resume_schedule(name))

    def workers(self) -> list[worker_registry.WorkerInfo]:
        """The live workers (:meth:`Client.workers`)."""
        return self._run(self._client.workers())

    def submit_message(self, data: bytes) -> list[str]:
        """Submit a task's JSON, a batch or a workflow as sent to ``tasks.submit`` (:meth:`Client.submit_message`)."""
        return self._run(self._client.submit_message(data))

    def dead_tasks(self, *, task_type: str | None = None, limit: int = 1000) -> list[dlq.DeadTask]:
        """Dead tasks in DLQ (:meth:`Client.dead_tasks`)."""
        return self._run(self._client.dead_tasks(task_type=task_type, limit=limit))

    def redrive(self, *, task_type: str | None = None, dry_run: bool = False) -> dlq.RedriveReport:
        """Submit dead tasks again as new tasks (:meth:`Client.redrive`)."""
        return self._run(self._client.redrive(task_type=task_type, dry_run=dry_run))

    def history(self, task_id: str) -> list[ev.Event]:
        """The task's events in order (:meth:`Client.history`)."""
        return self._run(self._client.history(task_id))

    def cluster_info(self) -> dict[str, Any]:
        """Server, settings and streams (:meth:`Client.cluster_info`)."""
        return self._run(self._client.cluster_info())

    def cluster_stats(self) -> dict[str, Any]:
        """Messages per stream, workers, schedulers (:meth:`Client.cluster_stats`)."""
        return self._run(self._client.cluster_stats())

    def regions(self) -> list[routing.RegionHealth]:
        """Each region as the masters' routing sees it (:meth:`Client.regions`)."""
        return self._run(self._client.regions())

    def limits(self) -> tuple[list[Lane], list[KeyInUse]]:
        """Lanes holding tasks back and concurrency keys in use (:meth:`Client.limits`)."""
        return self._run(self._client.limits())

    def breakers(self) -> list[Breaker]:
        """Every circuit breaker that ever opened (:meth:`Client.breakers`)."""
        return self._run(self._client.breakers())

    def open_breaker(self, task_type: str, *, region: str | None = None, for_s: float | None = None) -> list[Breaker]:
        """Force the breaker of ``task_type`` open (:meth:`Client.open_breaker`)."""
        return self._run(self._client.open_breaker(task_type, region=region, for_s=for_s))

    def close_breaker(self, task_type: str, *, region: str | None = None) -> list[Breaker]:
        """Force the breaker of ``task_type`` closed (:meth:`Client.close_breaker`)."""
        return self._run(self._client.close_breaker(task_type, region=region))

    def drain_worker(self, worker_id: str, *, timeout_s: float | None = None) -> worker_registry.WorkerInfo:
        """Ask a worker to drain, and wait ``timeout_s`` for it to go (:meth:`Client.drain_worker`)."""
        return self._run(self._client.drain_worker(worker_id, timeout_s=timeout_s), waits_s=timeout_s)


class SyncTaskHandle:
    """A submitted task, asked synchronously (see :class:`~streamsched.client.TaskHandle`)."""

    def __init__(self, client: SyncClient, handle: TaskHandle) -> None:
        self.client = client
        self._handle = handle
        self.id = handle.id

    def status(self) -> TaskState | None:
        return self.client._run(self._handle.status())

    def result(self, timeout_s: float = 60.0) -> Any:
        """The handler's return value; raises :class:`RuntimeError` if the task did not succeed
        and :class:`TimeoutError` if it has not finished within ``timeout_s``."""
        return self.client._run(self._handle.result(timeout_s), waits_s=timeout_s)

    def __repr__(self) -> str:
        return f"SyncTaskHandle({self.id!r})"


class SyncWorkflowHandle:
    """A submitted workflow, asked synchronously (see :class:`~streamsched.client.WorkflowHandle`)."""

    def __init__(self, client: SyncClient, handle: WorkflowHandle) -> None:
        self.client = client
        self._handle = handle
        self.id = handle.id

    def state(self) -> WorkflowState | None:
        return self.client._run(self._handle.state())

    def wait(self, timeout_s: float = 60.0) -> WorkflowState:
        return self.client._run(self._handle.wait(timeout_s), waits_s=timeout_s)

    def task_id(self, local_id: str) -> str:
        """The id a task of this workflow runs under."""
        return self._handle.task_id(local_id)

    def __repr__(self) -> str:
        return f"SyncWorkflowHandle({self.id!r})"
