"""`streamsched workers list` and `workers drain` against worker processes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import anyio
import pytest

from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.roles.worker_registry import WorkerInfo, live_workers
from streamsched.testing import EventLog
from streamsched.transport.bus import Bus

from .conftest import Processes, wait_exit, worker_id

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: The worker processes' heartbeat here: quick, so their counts show within a second.
HEARTBEAT_S = "0.3"


async def cli(processes: Processes, *args: str) -> anyio.abc.Process:
    """``streamsched <args>`` with the workers' environment (asynchronously: the schedulers run in this loop)."""
    return await anyio.run_process([sys.executable, "-m", "streamsched", *args], env=processes.env, check=False)


async def registered(bus: Bus, worker: str, ok: Callable[[WorkerInfo], bool] = bool, *, what: str = "registered") -> WorkerInfo:
    """The worker's live entry once ``ok`` holds for it."""
    deadline = time.monotonic() + 20.0
    while True:
        found = {info.id: info for info in await live_workers(bus)}
        info = found.get(worker)
        if info is not None and ok(info):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {worker} not {what} after 20s; live: {found}")
        await anyio.sleep(0.05)


async def test_workers_list_shows_a_running_worker_with_its_types_and_counts_as_a_table_and_as_json(
    bus, client: Client, schedulers, processes: Processes
):
    processes.env["STREAMSCHED_WORKER_HEARTBEAT_S"] = HEARTBEAT_S
    worker = worker_id(processes.worker("worker", concurrency=2, prefetch=0))
    for n in range(3):
        await client.submit("echo", {"n": n}, id=f"listed-{n}")
    for n in range(3):
        assert (await client.wait(f"listed-{n}", timeout_s=20)).status == "succeeded"
    await registered(bus, worker, lambda info: info.finished.get("succeeded") == 3, what="counting 3 successes")

    shown = await cli(processes, "workers", "list")
    assert shown.returncode == 0, shown.stderr.decode()
    header, *rows = shown.stdout.decode().splitlines()
    assert header.split()[:5] == ["ID", "REGION", "TYPES", "STATE", "RUNNING"]
    [row] = [row.split() for row in rows if row.startswith(worker)]
    assert row[1] == "default" and "echo" in row[2].split(",") and "sleep" in row[2].split(",")
    assert row[3:7] == ["running", "0/2", "0", "succeeded"] and row[7] == "3"

    as_json = await cli(processes, "workers", "list", "--json")
    [listed] = [json.loads(line) for line in as_json.stdout.decode().splitlines()]
    assert (listed["id"], listed["region"], listed["state"], listed["concurrency"], listed["prefetch"]) == (worker, "default", "running", 2, 0)
    assert "echo" in listed["types"] and listed["types"] == sorted(listed["types"])
    assert listed["finished"]["succeeded"] == 3 and listed["heartbeat_s"] == float(HEARTBEAT_S)


async def test_workers_drain_lets_the_in_flight_task_succeed_then_the_worker_deregisters_and_exits_zero(
    settings, bus, events: EventLog, client: Client, schedulers, processes: Processes
):
    processes.env["STREAMSCHED_WORKER_HEARTBEAT_S"] = HEARTBEAT_S
    draining = processes.worker("worker", concurrency=1, prefetch=0)
    worker = worker_id(draining)
    await registered(bus, worker)
    # Long enough to be running still when the drain command has started (grace_s is 5 s).
    await client.submit("sleep", {"seconds": 3.5}, id="in-flight-at-drain")
    await events.wait(lambda log: "started" in log.kinds_of("in-flight-at-drain"), timeout_s=20, what="the task's start")

    command = [sys.executable, "-m", "streamsched", "workers", "drain", worker, "--timeout", "30"]
    async with await anyio.open_process(command, env=processes.env) as drain:
        await registered(bus, worker, lambda info: (info.state, info.running) == ("draining", 1), what="draining its task")
        assert await drain.wait() == 0
        assert drain.stdout is not None
        said = (await drain.stdout.receive()).decode()
    assert said.startswith(f"draining {worker}: 1 running, 0 waiting"), said

    assert await wait_exit(draining, timeout_s=5) == 0, processes.logs()
    final = await events.wait_final("in-flight-at-drain", timeout_s=5)
    assert ev.kind(final) == "succeeded" and final.attempt == 1 and final.worker == worker
    assert worker not in {info.id for info in await live_workers(bus)}
    again = await cli(processes, "workers", "drain", worker)
    assert again.returncode == 3 and b"no live worker" in again.stderr
