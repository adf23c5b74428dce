"""Whole DAGs in one message: run in order, refused whole when invalid, tracked in KV ``workflows``."""

from __future__ import annotations

import json
import random

import msgspec
import pytest
from typer.testing import CliRunner

from streamsched.cli import app
from streamsched.client import Client, Workflow
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


def first_at(events: EventLog, task_id: str, kind: str) -> float:
    return min(e.at for e in events.of_task(task_id) if ev.kind(e) == kind)


async def test_a_workflow_dag_runs_in_order_and_its_state_counts(settings, bus, events: EventLog, examples):
    rng = random.Random(3)
    wf = Workflow("nightly")
    locals_: list[str] = []
    graph: dict[str, list[str]] = {}
    for i in range(40):
        deps = rng.sample(locals_, min(len(locals_), rng.randint(0, 3)))
        local = wf.task("echo", i, id=f"n{i}", depends_on=deps)
        graph[local] = deps
        locals_.append(local)
    rng.shuffle(wf.tasks)  # the order inside the message does not matter
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, examples)):
        handle = await client.submit_workflow(wf)
        state = await handle.wait(timeout_s=30)
    assert state.status == "succeeded"
    assert state.counts == {"succeeded": 40}
    assert set(state.tasks) == {f"nightly-n{i}" for i in range(40)}
    assert state.submitted_at <= state.started_at <= state.finished_at
    for local, deps in graph.items():
        for dep in deps:
            assert first_at(events, f"nightly-{dep}", "succeeded") <= first_at(events, f"nightly-{local}", "started")
    task = await client.get("nightly-n5")
    assert task is not None and task.labels == {"streamsched/workflow": "nightly"}


async def test_a_failing_workflow_counts_its_dead_and_cancelled_tasks(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus))
    spec = {
        "id": "wf-fail",
        "tasks": [
            {"id": "a", "type": "echo"},
            {"id": "b", "type": "fail", "max_attempts": 1, "depends_on": ["a"]},
            {"id": "c", "type": "echo", "depends_on": ["b"]},
        ],
    }
    async with running(await all_roles(settings, bus, examples)):
        state = await (await client.submit_workflow(spec)).wait(timeout_s=30)
    assert state.status == "failed"
    assert state.counts == {"succeeded": 1, "dead": 1, "cancelled": 1}
    assert state.tasks["wf-fail-c"] == "cancelled"


@pytest.mark.parametrize(
    ("tasks", "reason"),
    [
        (
            [
                {"id": "a", "type": "echo", "depends_on": ["c"]},
                {"id": "b", "type": "echo", "depends_on": ["a"]},
                {"id": "c", "type": "echo", "depends_on": ["b"]},
            ],
            "workflow bad has a cycle: a -> c -> b -> a (each depends on the next)",
        ),
        ([{"id": "a", "type": "echo", "depends_on": ["elsewhere"]}], "workflow bad: task a depends on 'elsewhere', which is not in the workflow"),
        ([{"id": "a", "type": "echo"}, {"id": "a", "type": "echo"}], "workflow bad: two tasks have the id 'a'"),
        ([{"id": "a", "type": "echo"}, {"id": "b", "type": "echo", "priority": "urgent"}], "workflow bad: task b: unknown priority 'urgent'"),
        ([{"type": "echo"}], "workflow bad: task 0 has no `id`"),
        (  # found only once times are known: still before anything is placed
            [{"id": "a", "type": "echo"}, {"id": "z", "type": "echo", "depends_on": ["a"], "delay_s": 10, "deadline_s": 5}],
            "workflow bad: task bad-z: the task would start (`run_at`/`delay_s`) at or after its deadline",
        ),
        ([{"id": "a", "type": "echo", "idempotency_key": "k"}], "workflow bad: task a: `idempotency_key` is not taken inside a workflow"),
    ],
)
async def test_an_invalid_workflow_is_rejected_whole_with_the_reason(settings, bus, events: EventLog, examples, tasks, reason):
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, examples)):
        await client.submit_workflow({"id": "bad", "tasks": tasks})
        rejected = await events.wait_final("bad")
    assert isinstance(rejected, ev.Rejected) and rejected.reason.startswith(reason), rejected.reason
    assert events.of_kind("submitted") == [] and events.of_kind("scheduled") == []  # nothing ran
    assert await client.get_workflow("bad") is None


def test_the_cli_submits_a_yaml_workflow_and_shows_its_state(settings, tmp_path, examples):
    import anyio

    from streamsched.transport.bus import Bus

    path = tmp_path / "flow.yaml"
    path.write_text("id: flow\ntasks:\n  - id: one\n    type: echo\n    payload: 1\n  - id: two\n    type: echo\n    depends_on: [one]\n")

    async def serve_and_run() -> tuple[int, str]:
        bus = await Bus.connect(settings.nats_url, name="roles")
        try:
            async with running(await all_roles(settings, bus, examples)):
                result = await anyio.to_thread.run_sync(
                    lambda: CliRunner().invoke(
                        app, ["submit", "--workflow", str(path), "--id", "flow2", "--wait"], env={"NATS_URL": settings.nats_url}
                    )
                )
                shown = await anyio.to_thread.run_sync(
                    lambda: CliRunner().invoke(app, ["status", "flow2", "--json"], env={"NATS_URL": settings.nats_url})
                )
        finally:
            await bus.close()
        return result.exit_code, result.output + shown.output

    from streamsched.transport import streams

    async def apply() -> None:
        bus = await Bus.connect(settings.nats_url, name="apply")
        await streams.apply(bus, settings)
        await bus.close()

    anyio.run(apply)
    code, output = anyio.run(serve_and_run)
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0] == "flow2"
    shown = json.loads(lines[-1])
    assert shown["status"] == "succeeded" and shown["tasks"] == {"flow2-one": "succeeded", "flow2-two": "succeeded"}
    assert msgspec.json.decode(lines[1])["counts"] == {"succeeded": 2}
    assert Status(shown["tasks"]["flow2-two"]) is Status.SUCCEEDED
