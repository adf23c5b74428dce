"""Full streams against a real nats-server with tiny limits: the client tries again within its
budget and then raises Overloaded naming the limit; it gets through when room appears; a full
stream refuses rather than evicts; a full SCHED or WORK holds tasks upstream and loses none."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.js.errors import APIError

from streamsched import subjects
from streamsched.client import Client, Workflow
from streamsched.config import Settings
from streamsched.errors import SERVER_STORAGE, Overloaded
from streamsched.eventlog import dlq
from streamsched.eventlog.dlq import DeadTask
from streamsched.eventlog.state import StateStore
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, all_roles, running
from streamsched.transport import overload, streams
from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer, free_port

from ..conftest import subprocess_env

pytestmark = pytest.mark.anyio

#: TASKS's limit here: room for a few dozen small messages.
TASKS_BYTES = 4096
#: SCHED's and WORK's: a couple of hundred tasks each, and still several whole SCHED batches
#: (a batch larger than the limit could never be stored).
QUEUE_BYTES = 64 * 1024


@pytest.fixture
def settings(server: NatsServer) -> Settings:
    return Settings.load({}, nats_url=server.url, tasks_max_bytes=TASKS_BYTES, submit_retry_budget_s=0.5, retry_base_s=0.05, ack_wait_s=5.0)


def with_budget(settings: Settings, budget_s: float) -> Settings:
    return msgspec.structs.replace(settings, submit_retry_budget_s=budget_s)


async def fill_tasks(bus: Bus) -> Any:
    """Publish small messages to TASKS (on ``tasks.rejected``, which no role reads) until it
    refuses one: what room is left is smaller than any submission. Returns its state then."""
    for n in range(10_000):
        try:
            await bus.js.publish(subjects.REJECTED, b"x" * 16, headers={subjects.H_MSG_ID: f"filler-{n}"})
        except APIError as exc:
            assert overload.refused_at(exc) == "max_bytes", exc
            return (await bus.js.stream_info(subjects.TASKS_STREAM)).state
    raise AssertionError("TASKS never filled up")


async def submissions(bus: Bus) -> dict[str, int]:
    """Stored submissions in TASKS, by subject."""
    return dict((await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter="tasks.submit.>")).state.subjects or {})


class Tries:
    """Counts the publishes on a subject, refused ones included: a core subscriber sees every
    publish, whatever JetStream answers."""

    def __init__(self) -> None:
        self.count = 0

    async def follow(self, bus: Bus, subject: str) -> Any:
        async def seen(_msg: Any) -> None:
            self.count += 1

        sub = await bus.nc.subscribe(subject, cb=seen)
        await bus.nc.flush()
        return sub

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> None:
        with anyio.fail_after(timeout_s):
            while self.count < count:
                await anyio.sleep(0.01)


async def test_a_submission_to_a_full_tasks_is_refused_after_the_budget_naming_the_limit_and_evicting_nothing(settings, bus):
    before = await fill_tasks(bus)
    client = Client(bus, await StateStore.open(bus), settings)
    began = time.monotonic()
    with pytest.raises(Overloaded) as caught:
        await client.submit("echo", 1, id="late")
    took = time.monotonic() - began
    assert str(caught.value).startswith(f"stream TASKS is full: max_bytes {TASKS_BYTES} (tasks_max_bytes); still full after 0.")
    refused = caught.value
    assert (refused.stream, refused.limit, refused.value, refused.setting) == ("TASKS", "max_bytes", TASKS_BYTES, "tasks_max_bytes")
    assert settings.submit_retry_budget_s <= took < settings.submit_retry_budget_s + 2.0
    # Discard new: the stream refused the newcomer and kept every message it had acknowledged.
    after = (await bus.js.stream_info(subjects.TASKS_STREAM)).state
    assert before.first_seq == 1
    assert (after.first_seq, after.last_seq, after.messages) == (before.first_seq, before.last_seq, before.messages)


async def test_a_zero_budget_raises_at_the_first_refusal(settings, bus):
    await fill_tasks(bus)
    client = Client(bus, await StateStore.open(bus), with_budget(settings, 0))
    began = time.monotonic()
    with pytest.raises(Overloaded, match=r"^stream TASKS is full: max_bytes 4096 \(tasks_max_bytes\); not retried"):
        await client.submit("echo", 1)
    assert time.monotonic() - began < settings.submit_retry_budget_s


async def test_every_way_of_submitting_raises_overloaded_when_tasks_is_full(settings, bus):
    await fill_tasks(bus)
    client = Client(bus, await StateStore.open(bus), with_budget(settings, 0))
    workflow = Workflow("wf")
    workflow.task("echo")
    refused: dict[str, Callable[[], Awaitable[object]]] = {
        "workflow": lambda: client.submit_workflow(workflow),
        "atomic batch": lambda: client.submit_many([{"type": "echo"}, {"type": "echo"}], atomic=True),
        "many": lambda: client.submit_many([{"type": "echo", "priority": "high"}] * 3),
        "idempotency key": lambda: client.submit("echo", idempotency_key="k1"),
    }
    for what, attempt in refused.items():
        with pytest.raises(Overloaded, match=r"^stream TASKS is full: max_bytes 4096 \(tasks_max_bytes\)"):
            await attempt()
        assert await submissions(bus) == {}, what
    # The key was given back with its refused submission: a later one takes it.
    await bus.js.purge_stream(subjects.TASKS_STREAM)
    handle = await client.submit("echo", idempotency_key="k1", id="keyed")
    assert handle.id == "keyed"


async def test_the_client_gets_through_when_room_appears_within_the_budget(settings, bus):
    await fill_tasks(bus)
    client = Client(bus, await StateStore.open(bus), with_budget(settings, 10.0))
    tries = Tries()
    await tries.follow(bus, "tasks.submit.>")
    result: dict[str, Any] = {}

    async def submit_one() -> None:
        result["one"] = await client.submit("echo", 1, id="patient")

    async def submit_many() -> None:
        result["many"] = await client.submit_many([{"type": "echo", "id": f"m{i}", "priority": "low"} for i in range(5)])

    began = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(submit_one)
        tg.start_soon(submit_many)
        await tries.wait_for(2 * (1 + 5))  # each refused, and tried again with backoff
        await bus.js.purge_stream(subjects.TASKS_STREAM, subject=subjects.REJECTED)  # room, as when old submissions expire
    assert time.monotonic() - began < 10.0
    assert result["one"].id == "patient" and len(result["many"]) == 5
    # Each stored once, though its publish was sent several times with the same msg id.
    assert await submissions(bus) == {"tasks.submit.medium": 1, "tasks.submit.low": 5}


async def test_submit_many_says_how_many_were_not_stored_and_the_same_tasks_go_in_once_later(settings, bus):
    client = Client(bus, await StateStore.open(bus), with_budget(settings, 0.3))
    specs = [{"type": "echo", "id": f"t{i:02}", "payload": "y" * 40} for i in range(40)]
    full = r"^stream TASKS is full: max_bytes 4096 \(tasks_max_bytes\); \d+ of 40 submissions are not known to be stored"
    with pytest.raises(Overloaded, match=full) as caught:
        await client.submit_many(specs, window=10)
    assert "submitting the same tasks again (same ids) is safe" in str(caught.value)
    stored = (await submissions(bus))["tasks.submit.medium"]
    assert 0 < stored < 40
    # Room for all of them (a larger limit): sent again, each is stored once.
    await streams.apply(bus, msgspec.structs.replace(settings, tasks_max_bytes=1024 * 1024))
    await client.submit_many(specs, window=10)
    assert await submissions(bus) == {"tasks.submit.medium": 40}


async def test_a_full_stream_still_acknowledges_a_message_it_holds_as_a_duplicate(settings, bus):
    """A try whose first publish landed, though its PubAck was lost, is not stored twice, nor
    refused: nats-server checks the msg id before the limits."""
    client = Client(bus, await StateStore.open(bus), with_budget(settings, 0))
    await client.submit("echo", 1, id="once")
    await fill_tasks(bus)
    await client.submit("echo", 1, id="once")
    assert await submissions(bus) == {"tasks.submit.medium": 1}


async def test_a_cancel_request_to_a_full_tasks_raises_overloaded(settings, bus):
    master, _regional, projector = await all_roles(settings, bus, None)
    client = Client(bus, await StateStore.open(bus), with_budget(settings, 0))
    async with running([master, projector]):
        await client.submit("echo", id="later", delay_s=60)
        with anyio.fail_after(10):
            while await client.get("later") is None:
                await anyio.sleep(0.05)
        await fill_tasks(bus)
        with pytest.raises(Overloaded, match=r"^stream TASKS is full: max_bytes 4096 \(tasks_max_bytes\)"):
            await client.cancel("later", reason="too late")
    assert not (await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=subjects.CANCEL)).state.subjects  # no request stored


async def test_a_dlq_redrive_into_a_full_tasks_raises_overloaded(settings, bus):
    dead = DeadTask(seq=7, stored_at=0.0, task_id="d1", type="echo", attempts=3, error="boom", body=b'{"id":"d1","type":"echo"}')
    await fill_tasks(bus)
    with pytest.raises(Overloaded, match=r"^stream TASKS is full: max_bytes 4096 \(tasks_max_bytes\)"):
        await dlq.redrive(bus, [dead], retry_budget_s=0.2)
    assert await submissions(bus) == {}


async def test_the_cli_prints_one_line_naming_the_limit_and_exits_7(settings, bus, tmp_path: Path):
    await fill_tasks(bus)
    env = {**subprocess_env(settings), "STREAMSCHED_SUBMIT_RETRY_BUDGET_S": "0"}
    result = await anyio.run_process([sys.executable, "-m", "streamsched", "submit", "echo"], env=env, check=False)
    assert result.returncode == 7, result.stderr.decode()
    assert result.stdout == b""
    one_line = f"error: stream TASKS is full: max_bytes {TASKS_BYTES} (tasks_max_bytes); not retried (submit_retry_budget_s is 0)"
    assert result.stderr.decode().splitlines() == [one_line]
    # A file whose tasks only partly fit: the ids of those stored are printed, the rest said.
    await bus.js.purge_stream(subjects.TASKS_STREAM)
    lines = tmp_path / "tasks.jsonl"
    lines.write_text("".join(f'{{"type":"echo","payload":"{"y" * 40}"}}\n' for _ in range(1200)))
    result = await anyio.run_process([sys.executable, "-m", "streamsched", "submit", "--file", str(lines)], env=env, check=False)
    assert result.returncode == 7, result.stderr.decode()
    errors = [line for line in result.stderr.decode().splitlines() if line.strip()]  # the progress bar leaves a blank line
    assert errors[0].startswith("error: stream TASKS is full"), errors
    assert errors[1:] == ["error: 0 of 1200 tasks are known to be stored (ids printed); some of the other 1200 may be too"]


async def test_full_server_storage_is_named_for_submissions_and_schedules(tmp_path: Path):
    config = tmp_path / "small.conf"
    config.write_text("jetstream { max_file_store: 4MB }\n")
    server = NatsServer(port=free_port(), store_dir=tmp_path / "js", config=config).start()
    try:
        small = 256 * 1024  # each stream's own limit, so that together they fit the server's
        settings = Settings.load(
            {},
            nats_url=server.url,
            tasks_max_bytes=small,
            queue_max_bytes=small,
            events_max_bytes=small,
            dlq_max_bytes=small,
            state_max_bytes=small,
            submit_retry_budget_s=0.2,
        )
        bus = await Bus.connect(server.url, name="test")
        try:
            await streams.apply(bus, settings)
            keys = await bus.js.key_value(subjects.IDEMPOTENCY_BUCKET)  # a bucket without a limit of its own
            with pytest.raises(APIError) as full:
                for n in range(200):
                    await keys.put(f"k{n}", b"x" * 50_000)
            assert overload.refused_at(full.value) == SERVER_STORAGE
            client = Client(bus, await StateStore.open(bus), settings)
            with pytest.raises(Overloaded, match=r"^the server's JetStream storage is full .*: stream TASKS cannot grow; still full after") as caught:
                await client.submit("echo")
            assert caught.value.limit == SERVER_STORAGE
            with pytest.raises(Overloaded, match=r"^the server's JetStream storage is full"):
                await client.add_schedule("tick", "@every 5s", "echo")
        finally:
            await bus.close()
    finally:
        server.stop()


async def test_a_full_sched_and_work_hold_tasks_upstream_and_lose_none(server, bus, events: EventLog, examples, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="streamsched.settle")
    settings = Settings.load({}, nats_url=server.url, queue_max_bytes=QUEUE_BYTES, retry_base_s=0.05, ack_wait_s=5.0)
    await streams.apply(bus, settings)
    master, regional, projector = await all_roles(settings, bus, None)  # no worker yet: WORK fills up
    client = Client(bus, await StateStore.open(bus), settings)
    count = 600
    async with running([master, regional, projector]):
        handles = await client.submit_many([{"type": "echo", "payload": n} for n in range(count)])

        def held(prefix: str) -> bool:
            return any(
                "ServiceUnavailableError 10077: maximum bytes exceeded" in record.getMessage() and f"; {prefix}" in record.getMessage()
                for record in caplog.records
            )

        # The regional scheduler holds what WORK refused (its SCHED messages come back), and the
        # master what SCHED refused (its submissions come back): each says which limit, and
        # each message comes back well within its consumer's ack_wait (30 s), so JetStream
        # never delivers a message a second time while a role still holds it.
        with anyio.fail_after(20):
            while not (held("sched.") and held("tasks.submit")):
                await anyio.sleep(0.1)
        work = (await bus.js.stream_info(subjects.WORK_STREAM)).state
        assert work.first_seq == 1  # nothing consumed and nothing evicted
        assert QUEUE_BYTES - 2048 < work.bytes <= QUEUE_BYTES
        async with running([Worker(settings, bus, examples, region="default", concurrency=16)]):
            for handle in handles:
                await events.wait_final(handle.id, timeout_s=60)
    for handle in handles:
        kinds = events.kinds_of(handle.id)
        assert kinds.count("started") == 1 and kinds.count("succeeded") == 1, (handle.id, kinds)
