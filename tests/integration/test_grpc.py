"""The gRPC API: the REST API's operations, checks and errors over grpc.aio, against a real
nats-server and the roles in this process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import grpc
import msgspec
import nats.errors
import pytest

from streamsched import grpc_server
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.errors import AlreadyFinished, NotFound, Overloaded, Rejected, Unavailable
from streamsched.eventlog.state import StateStore
from streamsched.grpc_gen import scheduler_pb2 as pb
from streamsched.grpc_gen.scheduler_pb2_grpc import SchedulerStub
from streamsched.registry import Registry
from streamsched.task_index import TaskIndex
from streamsched.testing import all_roles, running
from streamsched.transport.bus import Bus

if TYPE_CHECKING:  # the stubs' name for a SchedulerStub on an aio channel
    from streamsched.grpc_gen.scheduler_pb2_grpc import SchedulerAsyncStub

pytestmark = pytest.mark.anyio


async def serving(client: Client, index_bus: Bus) -> tuple[grpc.aio.Server, TaskIndex, SchedulerAsyncStub, grpc.aio.Channel]:
    index = TaskIndex(index_bus)
    await index.start()
    server, port = await grpc_server.start(client, index, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, index, SchedulerStub(channel), channel


@pytest.fixture
async def stub(settings: Settings, bus: Bus) -> AsyncIterator[SchedulerAsyncStub]:
    server, index, client, channel = await serving(Client(bus, await StateStore.open(bus), settings), bus)
    yield client
    await channel.close()
    await server.stop(None)
    await index.stop()


async def until_status(stub: SchedulerAsyncStub, task_id: str, status: str) -> pb.Task:
    with anyio.fail_after(15):
        while True:
            try:
                task = await stub.Get(pb.GetRequest(id=task_id))
            except grpc.aio.AioRpcError as exc:  # not projected yet
                assert exc.code() is grpc.StatusCode.NOT_FOUND
            else:
                if task.status == status:
                    return task
            await anyio.sleep(0.05)


async def test_a_task_submitted_over_grpc_runs_and_is_read_back(settings: Settings, bus: Bus, examples: Registry, stub: SchedulerAsyncStub):
    async with running(await all_roles(settings, bus, examples)):
        answer = await stub.Submit(pb.SubmitRequest(submission=b'{"type": "echo", "payload": [1, 2], "priority": "high"}'))
        (task_id,) = answer.ids
        task = await until_status(stub, task_id, "succeeded")
        with pytest.raises(grpc.aio.AioRpcError) as finished:
            await stub.Cancel(pb.CancelRequest(id=task_id, reason="too late"))
    assert (task.id, task.type, task.priority) == (task_id, "echo", "high")
    state = json.loads(task.state_json)
    assert state["id"] == task_id and state["status"] == "succeeded" and state["result"] == [1, 2]
    assert finished.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "already succeeded" in (finished.value.details() or "")


async def test_a_batch_gives_every_id_and_a_workflow_its_own(stub: SchedulerAsyncStub):
    batch = await stub.Submit(pb.SubmitRequest(submission=b'{"batch": [{"id": "b-1", "type": "echo"}, {"id": "b-2", "type": "echo"}]}'))
    workflow = await stub.Submit(pb.SubmitRequest(submission=b'{"workflow": {"id": "wf-1", "tasks": [{"id": "a", "type": "echo"}]}}'))
    assert list(batch.ids) == ["b-1", "b-2"] and list(workflow.ids) == ["wf-1"]


@pytest.mark.parametrize(
    ("submission", "reason", "field"),
    [
        (b'{"type": "echo", "priority": "urgent"}', "unknown priority 'urgent'", "priority"),
        (b'{"batch": [{"type": "echo"}, {"type": "echo", "max_attempts": 0}]}', "task 1 of the batch is invalid", "batch.1.max_attempts"),
        (b"not json", "JSON", None),
    ],
)
async def test_an_invalid_submission_is_invalid_argument_naming_the_reason(
    stub: SchedulerAsyncStub, submission: bytes, reason: str, field: str | None
):
    with pytest.raises(grpc.aio.AioRpcError) as rejected:
        await stub.Submit(pb.SubmitRequest(submission=submission))
    assert rejected.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (rejected.value.details() or "")
    assert dict(rejected.value.trailing_metadata() or ()).get(grpc_server.FIELD_KEY) == field


async def test_an_unknown_id_is_not_found_and_a_bad_request_invalid(stub: SchedulerAsyncStub):
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Get(pb.GetRequest(id="nope"))
    with pytest.raises(grpc.aio.AioRpcError) as not_an_id:
        await stub.Get(pb.GetRequest(id="not a task id"))
    with pytest.raises(grpc.aio.AioRpcError) as priority:
        await stub.Reprioritize(pb.ReprioritizeRequest(id="nope", priority="urgent"))
    with pytest.raises(grpc.aio.AioRpcError) as kind:
        async for _ in stub.Watch(pb.WatchRequest(kind="finished")):
            pass
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND and unknown.value.details() == "no task nope"
    assert not_an_id.value.code() is grpc.StatusCode.NOT_FOUND
    assert priority.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "unknown priority 'urgent'" in (priority.value.details() or "")
    assert kind.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "unknown kind 'finished'" in (kind.value.details() or "")


async def test_watch_sees_every_event_of_a_task_in_order(settings: Settings, bus: Bus, examples: Registry, stub: SchedulerAsyncStub):
    seen: list[pb.Event] = []
    async with running(await all_roles(settings, bus, examples)):
        feed = stub.Watch(pb.WatchRequest(task_id="watched"))
        with anyio.fail_after(15):
            await feed.initial_metadata()  # the feed has begun: what is submitted now is in it
            await stub.Submit(pb.SubmitRequest(submission=b'{"id": "watched", "type": "echo"}'))
            await stub.Submit(pb.SubmitRequest(submission=b'{"id": "other", "type": "echo"}'))
            async for event in feed:
                seen.append(event)
                if event.kind == "succeeded":
                    break
        feed.cancel()
    assert [event.kind for event in seen] == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
    assert {event.task_id for event in seen} == {"watched"} and [event.seq for event in seen] == sorted(event.seq for event in seen)
    started = seen[3]
    assert started.attempt == 1 and started.at > 0 and json.loads(started.event_json)["kind"] == "started"


async def test_list_returns_the_submitted_tasks_a_page_at_a_time(settings: Settings, bus: Bus, examples: Registry, stub: SchedulerAsyncStub):
    async with running(await all_roles(settings, bus, examples)):
        for i in range(3):
            await stub.Submit(pb.SubmitRequest(submission=b'{"id": "l-%d", "type": "echo", "labels": {"team": "a"}}' % i))
        with anyio.fail_after(15):
            while len((await stub.List(pb.ListRequest(status="succeeded", labels={"team": "a"}))).tasks) < 3:
                await anyio.sleep(0.05)
    first = await stub.List(pb.ListRequest(status="succeeded", labels={"team": "a"}, limit=2))
    rest = await stub.List(pb.ListRequest(status="succeeded", labels={"team": "a"}, limit=2, cursor=first.next_cursor))
    with pytest.raises(grpc.aio.AioRpcError) as bad_status:
        await stub.List(pb.ListRequest(status="finished"))
    assert [task.id for task in first.tasks] == ["l-2", "l-1"] and [task.id for task in rest.tasks] == ["l-0"] and rest.next_cursor == ""
    assert first.tasks[0].type == "echo" and dict(first.tasks[0].labels) == {"team": "a"} and first.tasks[0].HasField("submitted_at")
    assert bad_status.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(bad_status.value.trailing_metadata() or ())[grpc_server.FIELD_KEY] == "status"


async def test_a_call_while_nats_is_disconnected_is_unavailable(settings: Settings, bus: Bus):
    own = await Bus.connect(settings.nats_url, name="grpc-test")
    server, index, stub, channel = await serving(Client(own, await StateStore.open(own), settings), bus)
    await own.close()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.Get(pb.GetRequest(id="any"))
    finally:
        await channel.close()
        await server.stop(None)
        await index.stop()
    assert down.value.code() is grpc.StatusCode.UNAVAILABLE and "NATS is not reachable" in (down.value.details() or "")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (Rejected("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("no task x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyFinished("task x already succeeded", "succeeded"), grpc.StatusCode.FAILED_PRECONDITION),
        (Overloaded("TASKS", "max_bytes", value=1, setting="tasks_max_bytes"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (nats.errors.TimeoutError(), grpc.StatusCode.UNAVAILABLE),
        (ValueError("a bug"), None),
    ],
)
async def test_each_service_core_error_has_its_status_code(error: Exception, code: grpc.StatusCode | None):
    assert grpc_server.status_of(error) is code


async def test_a_taken_port_is_an_error_not_a_second_server(settings: Settings, bus: Bus):
    client = Client(bus, await StateStore.open(bus), settings)
    index = TaskIndex(bus)
    server, port = await grpc_server.start(client, index, port=0)
    try:
        with pytest.raises(OSError, match="in use"):
            await grpc_server.start(client, index, port=port)
    finally:
        await server.stop(None)


async def test_a_token_when_set_is_required_by_every_call(settings: Settings, bus: Bus):
    guarded = msgspec.structs.replace(settings, api_token="s3cret")
    server, index, stub, channel = await serving(Client(bus, await StateStore.open(bus), guarded), bus)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Submit(pb.SubmitRequest(submission=b'{"type": "echo"}'))
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.Get(pb.GetRequest(id="x"), metadata=(("authorization", "Bearer guess"),))
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in stub.Watch(pb.WatchRequest(kind="succeeded")):
                pass
        allowed = await stub.Submit(pb.SubmitRequest(submission=b'{"type": "echo"}'), metadata=(("authorization", "Bearer s3cret"),))
    finally:
        await channel.close()
        await server.stop(None)
        await index.stop()
    for refused in (unary, wrong, stream):
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED and "bearer token" in (refused.value.details() or "")
    assert len(allowed.ids) == 1
