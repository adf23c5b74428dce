"""A worker process started with ``--log-format json`` logs JSON lines, with the task's fields on a task's lines."""

from __future__ import annotations

import json

import pytest

from streamsched.client import Client

from .conftest import Processes

pytestmark = pytest.mark.anyio


async def test_a_json_logging_worker_puts_the_task_fields_on_its_retry_and_dead_lines(tmp_path, client: Client, schedulers, processes: Processes):
    processes.start("json-worker", "worker", "workers.examples", "--region", "default", "--concurrency", "1", "--log-format", "json")
    await client.submit("fail", id="logged-1", max_attempts=2)
    assert (await client.wait("logged-1", timeout_s=30)).status == "dead"

    lines = [json.loads(line) for line in (tmp_path / "json-worker.log").read_text().splitlines()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    about = [line for line in lines if line.get("task_id") == "logged-1"]
    assert [(line["level"], line["type"], line["attempt"]) for line in about] == [("INFO", "fail", 1), ("WARNING", "fail", 2)], processes.logs()
    assert "retry in" in about[0]["message"] and "is dead" in about[1]["message"]
