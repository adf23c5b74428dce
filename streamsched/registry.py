"""The ``@task`` decorator, the handler registry, and the current task's context.

The decorator only annotates the function; a worker builds its :class:`Registry` from
the modules it is told to load. There is no global registry to import in the right
order (Dramatiq's global broker is the cautionary tale).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar

import msgspec

from . import subjects

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__streamsched_task__"


@dataclass(frozen=True)
class TaskDef:
    """A handler and its defaults."""

    name: str
    fn: Callable[..., Any]
    timeout_s: float | None = None
    """Per-attempt limit; ``None`` means no limit."""
    max_attempts: int | None = None
    """Attempts before dead-lettering; ``None`` means the deployment default."""
    batch_size: int | None = None
    """A batch handler's most payloads per call; ``None``: one task per call."""
    batch_wait_s: float = 0.05
    """How long a batch handler's first task waits for more before the call."""

    @functools.cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)  # asked for every task: looked up once


def task(
    name: str | None = None,
    *,
    timeout_s: float | None = None,
    max_attempts: int | None = None,
    batch_size: int | None = None,
    batch_wait_s: float = 0.05,
) -> Callable[[F], F]:
    """Mark a function as the handler of tasks of type ``name`` (default: the function name).

    The handler receives the task's decoded ``payload`` and returns a JSON-serialisable
    result. Sync handlers run in a thread, async ones on the worker's event loop. Raise
    :class:`~streamsched.errors.Retry` to retry, :class:`~streamsched.errors.Fail` to
    fail for good; any other exception is retried until ``max_attempts``.

    With ``batch_size``, the handler is a batch handler: it receives a list of up to
    ``batch_size`` payloads (of the tasks of its type that reach the worker within
    ``batch_wait_s`` of the first, fewer when the wait ends or the worker's slots are
    taken) and returns a list of as many results, in order. Each task is still recorded,
    acked and retried on its own: an exception instance in place of a result is that
    task's error alone (a :class:`~streamsched.errors.Fail` fails it, anything else
    retries it); an exception raised by the handler is the error of every task of the
    batch. ``timeout_s`` bounds each call; :func:`current_batch` gives the tasks'
    contexts, in the order of the payloads.

    Example::

        @task("email.send", timeout_s=30, max_attempts=5)
        async def send_email(payload): ...

        @task("email.send_many", batch_size=100, batch_wait_s=0.05)
        async def send_emails(payloads): return [await send(p) for p in payloads]
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if name is not None and not subjects.is_type(name):
        # A worker fetches each type from a WORK subject named after it.
        raise ValueError(f"task type {name!r} is not valid: words of A-Z a-z 0-9 _ - : / joined by single dots, 200 characters at most")

    def mark(fn: F) -> F:
        setattr(fn, _MARK, TaskDef(name or fn.__name__, fn, timeout_s, max_attempts, batch_size, batch_wait_s))
        return fn

    return mark


class Registry:
    """Handlers by task type."""

    def __init__(self, defs: Iterable[TaskDef] = ()) -> None:
        self._defs: dict[str, TaskDef] = {}
        for d in defs:
            self.add(d)

    def add(self, definition: TaskDef) -> None:
        if definition.name in self._defs and self._defs[definition.name].fn is not definition.fn:
            raise ValueError(f"two handlers for task type {definition.name!r}")
        self._defs[definition.name] = definition

    def get(self, name: str) -> TaskDef | None:
        return self._defs.get(name)

    def names(self) -> list[str]:
        return sorted(self._defs)

    @classmethod
    def from_modules(cls, names: Iterable[str]) -> Registry:
        """Import each module (the current directory is on the path, as for Dramatiq) and collect its handlers."""
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        registry = cls()
        for name in names:
            registry.add_module(importlib.import_module(name))
        return registry

    def add_module(self, module: ModuleType) -> None:
        for value in vars(module).values():
            definition = getattr(value, _MARK, None)
            if isinstance(definition, TaskDef):
                self.add(definition)


class TaskControls(Protocol):
    """What the worker running a task offers its handler (one object per worker, shared by its tasks)."""

    def is_cancelled(self, task_id: str) -> bool: ...

    def report_progress(self, context: TaskContext, fraction: float | None, message: str) -> None: ...


#: Longest progress message kept.
MAX_PROGRESS_MESSAGE = 500


class TaskContext(msgspec.Struct, frozen=True, gc=False):
    """What a running handler may want to know about its task (see :func:`current_task`).

    A struct rather than a frozen dataclass: one is built per task, and a frozen
    dataclass sets each field through ``object.__setattr__``."""

    id: str
    type: str
    attempt: int
    max_attempts: int
    priority: str
    region: str
    worker: str
    controls: TaskControls | None = None
    """The worker's side of :attr:`cancelled` and :meth:`progress` (``None`` outside a worker)."""

    @property
    def cancelled(self) -> bool:
        """True once the task was cancelled (``streamsched cancel``). A sync handler checks it
        at its cooperative points and returns (or raises); an async handler is cancelled
        outright (:class:`asyncio.CancelledError` at its next ``await``). Either way the task
        ends ``cancelled``."""
        return self.controls is not None and self.controls.is_cancelled(self.id)

    def progress(self, fraction: float | None, message: str = "") -> None:
        """Report how far the task is: ``fraction`` in 0..1 (``None``: only a message).

        Safe from any thread and cheap to call often: a worker records at most one
        ``progress`` event per task every ``worker.PROGRESS_INTERVAL_S`` (the first at
        once, then the latest report of each interval, while the task runs)."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:  # NaN fails too
            raise ValueError(f"progress fraction must be between 0 and 1, not {fraction!r}")
        if self.controls is None:
            raise RuntimeError("progress() needs a task run by a worker")
        self.controls.report_progress(self, fraction, message[:MAX_PROGRESS_MESSAGE])

    dependency_results: dict[str, Any] = {}
    """The result of each of the task's dependencies (``depends_on``) by id; ``None`` for one
    that did not succeed (it ran under ``on_dependency_failure: run``)."""


_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("streamsched_task")
_current_batch: contextvars.ContextVar[tuple[TaskContext, ...]] = contextvars.ContextVar("streamsched_batch")


def current_task() -> TaskContext:
    """The task the calling handler is running (also inside sync handlers' threads)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() called outside a task handler (in a batch handler: current_batch())") from None


def current_batch() -> tuple[TaskContext, ...]:
    """The tasks of the calling batch handler's call, in the order of its payloads."""
    try:
        return _current_batch.get()
    except LookupError:
        raise RuntimeError("current_batch() called outside a batch handler") from None
