"""Log lines: readable text by default, or one JSON object a line (``--log-format json``).

A line about a task carries its fields: ``task_id``, ``type``, ``attempt`` and ``trace_id``.
The roles' task-related log calls pass them with ``extra=logs.task(...)``; a handler's own
lines get them from the task it runs in (:func:`streamsched.registry.current_task`), and the
trace id comes from the current span when tracing is on (a worker's attempt span is current
while its handler runs). Nothing here runs unless a line is logged.

JSON lines hold ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the task's
fields when the line is about a task, and ``exception`` with its traceback when there is one.
Text lines are ``<time> <level> <logger>: <message>``, with `` trace_id=<id>`` when known.
"""

from __future__ import annotations

import datetime
import logging
import sys
from typing import Any

import msgspec
from opentelemetry import trace

from . import tracing
from .registry import _current

#: The formats of ``--log-format`` (and ``STREAMSCHED_LOG_FORMAT``).
FORMATS = ("text", "json")
#: The text format's layout.
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def task(task_id: str, task_type: str = "", attempt: int = 0, trace: str = "") -> dict[str, Any]:
    """``extra=`` of a log call about a task (``trace``: its ``traceparent``, if the caller has it)."""
    fields: dict[str, Any] = {"task_id": task_id}
    if task_type:
        fields["task_type"] = task_type
    if attempt:
        fields["attempt"] = attempt
    if trace:
        fields["trace_id"] = tracing.trace_id(trace)
    return fields


def task_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The task fields of ``record``: given with :func:`task`, else the running handler's task's."""
    fields: dict[str, Any] = {}
    task_id = getattr(record, "task_id", None)
    if task_id is not None:
        fields["task_id"] = task_id
        for key, name in (("task_type", "type"), ("attempt", "attempt")):
            value = getattr(record, key, None)
            if value:
                fields[name] = value
    else:
        context = _current.get(None)
        if context is not None:
            fields.update(task_id=context.id, type=context.type, attempt=context.attempt)
    trace_id = getattr(record, "trace_id", None) or _current_trace_id()
    if trace_id:
        fields["trace_id"] = trace_id
    return fields


def _current_trace_id() -> str:
    if not tracing.ENABLED:
        return ""
    found = trace.get_current_span().get_span_context()
    return f"{found.trace_id:032x}" if found.is_valid else ""


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(task_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(line).decode()


class TextFormatter(logging.Formatter):
    """The readable layout, with the trace id of a task's line when there is one (the task
    id and type are in the messages themselves)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        trace_id = getattr(record, "trace_id", None) or _current_trace_id()
        if not trace_id:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} trace_id={trace_id}{newline}{rest}"


def configure(level: str = "INFO", log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
