"""The CLI against a real server: streams apply/show, submit --wait, status --json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import pytest

from streamsched import subjects
from streamsched.config import Settings
from streamsched.testing import all_roles, running
from streamsched.transport import streams
from streamsched.transport.server import NatsServer, free_port

from ..conftest import subprocess_env

pytestmark = pytest.mark.anyio


async def cli(settings: Settings, *args: str, check: bool = True) -> anyio.abc.Process:
    result = await anyio.run_process([sys.executable, "-m", "streamsched", *args], env=subprocess_env(settings), check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"streamsched {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


async def test_streams_apply_is_idempotent_and_reports_what_changed(settings, bus):
    # The bus fixture already applied the defaults once.
    assert {change.action for change in await streams.apply(bus, settings)} == {"unchanged"}
    # A worker loading "echo" made its WORK durables; apply brings them up to date too.
    (echo_high, *_) = await streams.ensure_work_consumers(bus, settings, "default", ["echo"])
    more = Settings.load({}, nats_url=settings.nats_url, regions=("default", "eu"), ack_wait_s=9.0)
    changes = {str(c.name): c for c in await streams.apply(bus, more)}
    assert changes["SCHED/regional-eu-high"].action == "created"
    assert changes[f"WORK/{echo_high}"].action == "updated"
    assert "ack_wait" in changes[f"WORK/{echo_high}"].detail
    assert changes["TASKS"].action == "unchanged"
    assert (await bus.js.consumer_info("WORK", echo_high)).config.ack_wait == 9.0


async def test_streams_apply_says_in_one_line_what_the_server_refused(tmp_path: Path):
    config = tmp_path / "small.conf"
    config.write_text("jetstream { max_file_store: 64MB }\n")  # less than the streams reserve
    with NatsServer(port=free_port(), store_dir=tmp_path / "js", config=config) as server:
        result = await cli(Settings.load({}, nats_url=server.url), "streams", "apply", check=False)
    assert result.returncode == 1
    error = result.stderr.decode()
    assert error.startswith("error: JetStream refused a definition:") and "10047" in error and "Sizing" in error, error
    assert "Traceback" not in error


async def test_streams_show_prints_depth_per_subject_and_consumers(settings, bus):
    (_, _, echo_low) = await streams.ensure_work_consumers(bus, settings, "default", ["echo"])
    await bus.js.publish(subjects.work("default", "low", "echo"), b"x", headers={"Streamsched-Task-Id": "x"})
    out = (await cli(settings, "streams", "show")).stdout.decode()
    assert "work.default.low.echo" in out
    assert f"consumer {echo_low}" in out and "pending=1" in out


async def test_submit_wait_prints_the_outcome_and_status_json_reads_it_back(settings, bus, examples):
    async with running(await all_roles(settings, bus, examples, concurrency=2)):
        done = await cli(settings, "submit", "echo", "--payload", '{"n": 7}', "--priority", "high", "--id", "cli-1", "--wait", "--timeout", "20")
        lines = done.stdout.decode().splitlines()
        assert lines[0] == "cli-1"
        outcome = json.loads(lines[1])
        assert (outcome["status"], outcome["result"], outcome["priority"]) == ("succeeded", {"n": 7}, "high")
        on_tasks = await bus.js.stream_info("TASKS", subjects_filter="tasks.submit.*")
        assert on_tasks.state.subjects == {"tasks.submit.high": 1}  # on its priority's subject

        shown = json.loads((await cli(settings, "status", "cli-1", "--json")).stdout)
        assert shown["status"] == "succeeded" and shown["attempts"] == 1

        failed = await cli(settings, "submit", "fail_permanent", "--wait", "--timeout", "20", check=False)
        assert failed.returncode == 4  # Exit.TASK_FAILED
        missing = await cli(settings, "status", "no-such-task", check=False)
        assert missing.returncode == 3  # Exit.NOT_FOUND
        bad = await cli(settings, "submit", "echo", "--payload", "{not json", check=False)
        assert bad.returncode == 2 and b"not JSON" in bad.stderr


async def test_submit_takes_a_delay_a_deadline_and_an_idempotency_key(settings, bus, examples, events):
    async with running(await all_roles(settings, bus, examples)):
        before = time.time()
        await cli(settings, "submit", "echo", "--id", "cli-later", "--delay-s", "30", "--deadline-s", "60")
        waiting = await events.wait_count("waiting", 1)
        assert waiting[0].task_id == "cli-later" and 29 < waiting[0].until - before < 31
        first = (await cli(settings, "submit", "echo", "--idempotency-key", "cli-key")).stdout.strip()
        again = (await cli(settings, "submit", "echo", "--idempotency-key", "cli-key")).stdout.strip()
        assert first == again


async def test_a_command_gives_up_on_an_unreachable_server_with_one_line(settings, tmp_path):
    from streamsched.transport.server import free_port

    down = Settings.load({}, nats_url=f"nats://127.0.0.1:{free_port()}")
    for args in (["status", "x"], ["streams", "show"], ["up", "--nats-url", down.nats_url, "--data-dir", str(tmp_path), "--api-port", "0"]):
        with anyio.fail_after(30):
            result = await cli(down, *args, check=False)
        errors = result.stderr.decode().strip().splitlines()
        assert result.returncode == 1, (args, result.stderr)
        assert errors[-1].startswith(f"error: cannot reach NATS at {down.nats_url}"), (args, errors)
        assert "Traceback" not in result.stderr.decode()
