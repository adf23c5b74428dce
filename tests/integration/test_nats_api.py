"""The NATS service API: found through $SRV, and the same operations, checks and errors as the
REST API, spoken from a plain NATS connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from streamsched import nats_api
from streamsched.client import Client
from streamsched.eventlog.state import StateStore
from streamsched.testing import all_roles, running
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(settings, bus) -> AsyncIterator[None]:
    started = await nats_api.start(Client(bus, await StateStore.open(bus), settings))
    yield
    await started.stop()


async def call(bus: Bus, operation: str, body: Any = None) -> tuple[Any, dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    reply = await bus.nc.request(f"streamsched.api.{operation}", data, timeout=10)
    return json.loads(reply.data) if reply.data else None, dict(reply.headers or {})


async def test_the_service_is_found_through_srv_with_its_endpoints(bus, service):
    ping = json.loads((await bus.nc.request("$SRV.PING.streamsched", b"", timeout=5)).data)
    info = json.loads((await bus.nc.request("$SRV.INFO.streamsched", b"", timeout=5)).data)
    assert ping["name"] == "streamsched" and ping["type"] == "io.nats.micro.v1.ping_response"
    assert {endpoint["subject"] for endpoint in info["endpoints"]} == {f"streamsched.api.{subject}" for subject, _ in nats_api.OPERATIONS.values()}


async def test_a_task_submitted_over_nats_runs_and_is_read_back(settings, bus, examples, service):
    async with running(await all_roles(settings, bus, examples)):
        answer, headers = await call(bus, "tasks.submit", {"type": "echo", "payload": [1, 2]})
        assert "Nats-Service-Error-Code" not in headers
        (task_id,) = answer["ids"]
        with anyio.fail_after(15):
            while (state := (await call(bus, "tasks.get", {"id": task_id}))[0]).get("status") != "succeeded":
                await anyio.sleep(0.05)
        events, _ = await call(bus, "tasks.events", {"id": task_id})
        workers, _ = await call(bus, "workers.list")
        stats, _ = await call(bus, "cluster.stats")
    assert state["result"] == [1, 2] and events[-1]["kind"] == "succeeded"
    assert len(workers) == 1 and stats["workers"] == 1


@pytest.mark.parametrize(
    ("operation", "body", "code", "field"),
    [
        ("tasks.submit", {"type": "echo", "priority": "urgent"}, "422", "priority"),
        ("tasks.submit", b"not json", "422", None),
        ("tasks.get", {"id": "nope"}, "404", None),
        ("tasks.get", {"task": "nope"}, "422", "task"),
        ("workflows.get", {"id": "nope"}, "404", None),
        ("tasks.priority", {"id": "x", "priority": "urgent"}, "422", "priority"),
    ],
)
async def test_errors_carry_the_code_and_the_reason(bus, service, operation: str, body: Any, code: str, field: str | None):
    answer, headers = await call(bus, operation, body)
    assert headers["Nats-Service-Error-Code"] == code
    assert headers["Nats-Service-Error"] == answer["error"] and answer.get("field") == field


async def test_tasks_are_listed_over_nats(settings, bus, examples):
    from streamsched.task_index import TaskIndex

    index = TaskIndex(bus)
    await index.start()
    started = await nats_api.start(Client(bus, await StateStore.open(bus), settings), index)
    try:
        async with running(await all_roles(settings, bus, examples)):
            for i in range(3):
                await call(bus, "tasks.submit", {"id": f"n-{i}", "type": "echo"})
            with anyio.fail_after(15):  # all three first: the newest two are the first page
                while len((await call(bus, "tasks.list", {"status": "succeeded", "limit": 3}))[0]["tasks"]) < 3:
                    await anyio.sleep(0.05)
            page, _ = await call(bus, "tasks.list", {"status": "succeeded", "limit": 2})
            while True:
                rest, _ = await call(bus, "tasks.list", {"status": "succeeded", "limit": 2, "cursor": page["next_cursor"]})
                if rest["tasks"]:
                    break
                await anyio.sleep(0.05)
        bad, headers = await call(bus, "tasks.list", {"status": "finished"})
        assert "finished" in bad["error"]
    finally:
        await started.stop()
        await index.stop()
    assert [task["id"] for task in page["tasks"]] == ["n-2", "n-1"] and [task["id"] for task in rest["tasks"]] == ["n-0"]
    assert headers["Nats-Service-Error-Code"] == "422"
