"""Progress reports of running tasks (``current_task().progress(...)``), rate-limited per task.

A handler may report as often as it likes, from the event loop or from its thread: the
first report of a task is recorded at once as a ``progress`` event, later ones at most
once per :data:`PROGRESS_INTERVAL_S`, each time the latest report of the interval (the
others are dropped). A report still pending when the task has ended is dropped: its
outcome says more. A task that stops reporting for an interval starts afresh.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from ..eventlog import events as ev
from ..registry import TaskContext

#: Seconds between two ``progress`` events of one task at least.
PROGRESS_INTERVAL_S = 0.5


class _Slot:
    """The report of one task attempt waiting for its turn."""

    __slots__ = ("context", "latest")

    def __init__(self, context: TaskContext) -> None:
        self.context = context
        self.latest: tuple[float | None, str, float] | None = None  # fraction, message, at


class ProgressReports:
    """Turns reports into ``progress`` events: ``record(event)`` for the first report of a task
    and then for the latest one of each interval while ``is_running(task_id)``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        record: Callable[[ev.Event], None],
        is_running: Callable[[str], bool],
        *,
        interval_s: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self._loop = loop
        self._record = record
        self._is_running = is_running
        self.interval_s = interval_s
        self._lock = threading.Lock()  # reports come from handler threads too
        self._slots: dict[tuple[str, int], _Slot] = {}

    def report(self, context: TaskContext, fraction: float | None, message: str) -> None:
        """Keep the report; the first of a task (or after a quiet interval) goes out on the next loop tick."""
        key = (context.id, context.attempt)
        with self._lock:
            slot = self._slots.get(key)
            first = slot is None
            if slot is None:
                slot = self._slots[key] = _Slot(context)
            slot.latest = (fraction, message, time.time())
        if first:
            self._loop.call_soon_threadsafe(self._flush, key)

    def _flush(self, key: tuple[str, int]) -> None:
        """Record the pending report, then look again after an interval; a slot with nothing
        pending (or whose task has ended) is dropped."""
        with self._lock:
            slot = self._slots.get(key)
            latest = slot.latest if slot is not None else None
            if slot is None or latest is None or not self._is_running(key[0]):
                self._slots.pop(key, None)
                return
            slot.latest = None
        fraction, message, at = latest
        context = slot.context
        self._record(
            ev.Progress(
                task_id=context.id,
                at=at,
                attempt=context.attempt,
                region=context.region,
                worker=context.worker,
                fraction=fraction,
                message=message,
            )
        )
        self._loop.call_later(self.interval_s, self._flush, key)
