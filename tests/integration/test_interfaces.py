"""One task, any door: the same tasks submitted with `nats pub`, the async and the sync
Python clients, the REST API, the NATS service API and the gRPC API end in the same state,
with the same events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import grpc
import httpx
import msgspec
import pytest

from streamsched import grpc_server, nats_api, subjects
from streamsched.client import Client
from streamsched.eventlog.state import StateStore
from streamsched.grpc_gen import scheduler_pb2 as pb
from streamsched.grpc_gen.scheduler_pb2_grpc import SchedulerStub
from streamsched.rest import create_app
from streamsched.sync_client import SyncClient
from streamsched.task_index import TaskIndex
from streamsched.testing import EventLog, all_roles, running, serving_http
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

#: The task kinds each door submits (ids get the door's name in front).
KINDS: list[dict[str, Any]] = [
    {"id": "echo", "type": "echo", "payload": {"n": 1}, "labels": {"k": "v"}},
    {"id": "high", "type": "echo", "priority": "high"},
    {"id": "later", "type": "echo", "delay_s": 0.2},
    {"id": "dead", "type": "fail", "max_attempts": 1},
]
#: What may differ between doors: ids, times, the worker, where events are stored.
VARYING = {"id", "submitted_at", "scheduled_at", "started_at", "finished_at", "updated_at", "worker", "event_seqs", "not_before", "error"}


@pytest.fixture
async def rest(settings, bus) -> AsyncIterator[str]:
    async with serving_http(create_app(settings, nats_service=False)) as base_url:
        yield base_url


def with_door(door: str, task: dict[str, Any]) -> dict[str, Any]:
    return {**task, "id": f"{door}-{task['id']}"}


async def test_every_door_ends_in_the_same_states_and_events(settings, bus: Bus, examples, events: EventLog, rest: str):
    client = Client(bus, await StateStore.open(bus), settings)
    service = await nats_api.start(client)
    index = TaskIndex(bus)
    await index.start()
    grpc_api, grpc_port = await grpc_server.start(client, index, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")

    async def nats_pub(task: dict[str, Any]) -> None:
        await bus.nc.publish(subjects.SUBMIT, json.dumps(task).encode())

    async def async_client(task: dict[str, Any]) -> None:
        await client.submit_message(msgspec.json.encode(task))

    async def sync_client(task: dict[str, Any]) -> None:
        def submit() -> None:
            with SyncClient.connect(settings.nats_url, settings=settings) as sync:
                sync.submit_message(msgspec.json.encode(task))

        await anyio.to_thread.run_sync(submit)

    async def over_rest(task: dict[str, Any]) -> None:
        async with httpx.AsyncClient(base_url=rest) as http:
            assert (await http.post("/api/v1/tasks", json=task)).status_code == 201

    async def nats_service(task: dict[str, Any]) -> None:
        reply = await bus.nc.request("streamsched.api.tasks.submit", json.dumps(task).encode(), timeout=10)
        assert "Nats-Service-Error-Code" not in (reply.headers or {})

    async def over_grpc(task: dict[str, Any]) -> None:
        await SchedulerStub(channel).Submit(pb.SubmitRequest(submission=json.dumps(task).encode()))

    doors: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
        "pub": nats_pub,
        "async": async_client,
        "sync": sync_client,
        "rest": over_rest,
        "service": nats_service,
        "grpc": over_grpc,
    }
    try:
        async with running(await all_roles(settings, bus, examples)):
            for door, submit in doors.items():
                for task in KINDS:
                    await submit(with_door(door, task))
            states = {}
            for door in doors:
                for task in KINDS:
                    task_id = with_door(door, task)["id"]
                    states[task_id] = await client.wait(task_id, timeout_s=20)
            final = {"succeeded", "dead"}
            ids = [with_door(door, task)["id"] for door in doors for task in KINDS]
            await events.wait(lambda log: all(final & set(log.kinds_of(task_id)) for task_id in ids), what="every outcome in the log")
    finally:
        await service.stop()
        await channel.close()
        await grpc_api.stop(None)
        await index.stop()

    def comparable(state: Any) -> dict[str, Any]:
        return {k: v for k, v in msgspec.to_builtins(msgspec.structs.replace(state, result=msgspec.UNSET)).items() if k not in VARYING}

    for task in KINDS:
        reference = comparable(states[f"pub-{task['id']}"])
        kinds = events.kinds_of(f"pub-{task['id']}")
        for door in doors:
            task_id = f"{door}-{task['id']}"
            assert comparable(states[task_id]) == reference, task_id
            assert events.kinds_of(task_id) == kinds, task_id
    assert {states[f"{door}-dead"].status.value for door in doors} == {"dead"}
    assert {states[f"{door}-high"].priority for door in doors} == {"high"}
