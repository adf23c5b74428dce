"""Log formats (streamsched.logs) and when the OTEL_* variables turn tracing on (streamsched.tracing)."""

from __future__ import annotations

import json
import logging

import pytest

from streamsched import logs, tracing
from streamsched.config import ConfigError, Settings
from streamsched.registry import TaskContext, _current

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def record(message: str, *args: object, extra: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    logger = logging.getLogger("streamsched.worker")
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError as error:
            exc_info = (type(error), error, error.__traceback__)
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, args, exc_info, extra=extra)


def test_a_task_line_in_json_has_the_task_fields_and_the_trace_id() -> None:
    line = record("task %s (%s) failed: %s", "t-1", "email.send", "nope", extra=logs.task("t-1", "email.send", 2, TRACEPARENT))
    parsed = json.loads(logs.JsonFormatter().format(line))
    assert parsed["message"] == "task t-1 (email.send) failed: nope"
    assert (parsed["level"], parsed["logger"]) == ("WARNING", "streamsched.worker")
    assert parsed["time"].endswith("+00:00")
    assert {key: parsed[key] for key in ("task_id", "type", "attempt", "trace_id")} == {
        "task_id": "t-1",
        "type": "email.send",
        "attempt": 2,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }


def test_a_line_logged_inside_a_handler_gets_its_task_from_the_running_task() -> None:
    context = TaskContext(id="t-2", type="report.build", attempt=3, max_attempts=5, priority="medium", region="default", worker="w")
    token = _current.set(context)
    try:
        parsed = json.loads(logs.JsonFormatter().format(record("halfway")))
    finally:
        _current.reset(token)
    assert (parsed["task_id"], parsed["type"], parsed["attempt"]) == ("t-2", "report.build", 3)


def test_a_line_about_no_task_has_no_task_fields_and_keeps_its_traceback() -> None:
    parsed = json.loads(logs.JsonFormatter().format(record("connected", exc=True)))
    assert not {"task_id", "type", "attempt", "trace_id"} & parsed.keys()
    assert "RuntimeError: boom" in parsed["exception"]


def test_text_lines_stay_readable_with_the_trace_id_at_the_end() -> None:
    text = logs.TextFormatter().format(record("task %s retried", "t-3", extra=logs.task("t-3", trace=TRACEPARENT)))
    assert "WARNING streamsched.worker: task t-3 retried trace_id=0af7651916cd43dd8448eb211c80319c" in text
    assert not text.startswith("{")
    plain = logs.TextFormatter().format(record("connected"))
    assert plain.endswith("WARNING streamsched.worker: connected")


def test_the_log_format_setting_is_checked() -> None:
    assert Settings.load({"STREAMSCHED_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="log_format"):
        Settings.load({"STREAMSCHED_LOG_FORMAT": "xml"})
    with pytest.raises(ValueError, match="text or json"):
        logs.configure("INFO", "xml")


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, "console"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, "otlp"),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask_for_export(env: dict[str, str], exporter: str | None) -> None:
    assert tracing.requested_exporter(env) == exporter


def test_without_otel_variables_configure_leaves_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configure("streamsched-test") is False
    assert tracing.ENABLED is False


def test_otel_variables_that_ask_for_export_turn_tracing_on_until_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    try:
        assert tracing.configure("streamsched-test") is True
        assert tracing.ENABLED is True
        traceparent = tracing.hop("master", "", {"streamsched.task.id": "t-4"})
        assert len(tracing.trace_id(traceparent)) == 32
        child = tracing.hop("regional", traceparent, {"streamsched.task.id": "t-4"})
        assert tracing.trace_id(child) == tracing.trace_id(traceparent) and child != traceparent
    finally:
        tracing.shutdown()
    assert tracing.ENABLED is False
