"""The event-log commands of the CLI, against a real server with the roles running in-process."""

from __future__ import annotations

import json

import anyio
import pytest

from streamsched.testing import all_roles, running

from .test_cli import cli

pytestmark = pytest.mark.anyio


async def test_the_event_log_commands_read_filter_redrive_and_rebuild(settings, bus, events, examples):
    async with running(await all_roles(settings, bus, examples, concurrency=4)):
        await bus.nc.publish("tasks.submit", b'{"id":"ok1","type":"echo","payload":"hi"}')
        await bus.nc.publish("tasks.submit", b'{"id":"bad1","type":"fail","max_attempts":1}')
        await events.wait_final("ok1")
        await events.wait_final("bad1")
        # The DLQ entry and the `dead` event are published together: either may land first.
        with anyio.fail_after(10):
            while (await bus.js.stream_info("DLQ")).state.messages < 1:
                await anyio.sleep(0.02)

        tail = await cli(settings, "events", "tail", "--kind", "succeeded", "--json")
        lines = [json.loads(line) for line in tail.stdout.decode().splitlines()]
        assert [(e["task_id"], e["kind"], e["result"]) for e in lines] == [("ok1", "succeeded", "hi")]
        assert lines[0]["stored_at"] >= lines[0]["at"] - 1

        history = (await cli(settings, "task", "history", "ok1")).stdout.decode().splitlines()
        assert [line.split()[3] for line in history[:-1]] == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
        assert history[-1].startswith("total ")

        listed = (await cli(settings, "dlq", "list", "--type", "fail")).stdout.decode()
        assert "bad1" in listed and "fail always fails" in listed
        assert (await cli(settings, "dlq", "redrive", check=False)).returncode == 2  # no filter, no --all
        dry = (await cli(settings, "dlq", "redrive", "--all", "--dry-run")).stdout.decode()
        assert "would re-drive 1" in dry and "bad1-r" in dry
        assert "bad1" in (await cli(settings, "dlq", "list")).stdout.decode()  # a dry run changes nothing

        rebuilt = await cli(settings, "replay", "rebuild-state", "--into", "tasks_check", "--compare", "tasks")
        assert "0 task(s) differ" in rebuilt.stdout.decode()

    unreachable = await cli(settings, "replay", "submissions", "--since", "1", "--to", "nats://127.0.0.1:1", check=False)
    assert unreachable.returncode != 0 and b"not a reachable streamsched deployment" in unreachable.stderr
    schema = json.loads((await cli(settings, "schema", "events")).stdout)
    array, one = schema["anyOf"]  # a message holds an array of events, or one event
    assert array["type"] == "array" and array["items"]["anyOf"] == one["anyOf"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in one["anyOf"]} >= {"Submitted", "Dead", "Reprioritized"}
    assert (await cli(settings, "events", "tail", "--since", "yesterday", check=False)).returncode == 2
