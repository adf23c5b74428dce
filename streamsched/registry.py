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
from typing import Any, TypeVar

import msgspec

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

    @functools.cached_property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)  # asked for every task: looked up once


def task(name: str | None = None, *, timeout_s: float | None = None, max_attempts: int | None = None) -> Callable[[F], F]:
    """Mark a function as the handler of tasks of type ``name`` (default: the function name).

    The handler receives the task's decoded ``payload`` and returns a JSON-serialisable
    result. Sync handlers run in a thread, async ones on the worker's event loop. Raise
    :class:`~streamsched.errors.Retry` to retry, :class:`~streamsched.errors.Fail` to
    fail for good; any other exception is retried until ``max_attempts``.

    Example::

        @task("email.send", timeout_s=30, max_attempts=5)
        async def send_email(payload): ...
    """

    def mark(fn: F) -> F:
        setattr(fn, _MARK, TaskDef(name or fn.__name__, fn, timeout_s, max_attempts))
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
    dependency_results: dict[str, Any] = {}
    """The result of each of the task's dependencies (``depends_on``) by id; ``None`` for one
    that did not succeed (it ran under ``on_dependency_failure: run``)."""


_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("streamsched_task")


def current_task() -> TaskContext:
    """The task the calling handler is running (also inside sync handlers' threads)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() called outside a task handler") from None
