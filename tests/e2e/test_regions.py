"""Two regions as processes: killing every worker of one moves new work to the other within a
few heartbeats, a task pinned to the dead region waits there with the reason and runs when a
worker of it comes back, and `regions list` shows it all."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable

import anyio
import msgspec
import pytest

from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.roles.routing import RegionHealth
from streamsched.transport import streams
from streamsched.transport.bus import Bus

from .conftest import Processes, worker_id

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: The role processes' heartbeat here: a dead worker is stale 0.9 s after its last one.
HEARTBEAT_S = 0.3


def start_worker(processes: Processes, name: str, region: str) -> str:
    process = processes.start(name, "worker", "workers.examples", "--region", region, "--concurrency", "4")
    return worker_id(process)


async def regions_until(
    client: Client, ok: Callable[[dict[str, RegionHealth]], bool], *, what: str, timeout_s: float = 20.0
) -> dict[str, RegionHealth]:
    deadline = time.monotonic() + timeout_s
    while not ok(found := {health.region: health for health in await client.regions()}):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout_s}s; regions: {found}")
        await anyio.sleep(0.05)
    return found


async def logged(processes: Processes, name: str, line: str, *, after: int = 0, timeout_s: float = 20.0) -> int:
    """Wait until role ``name`` logged ``line`` (past its first ``after`` bytes); the log's length then."""
    path = processes.log_dir / f"{name}.log"
    deadline = time.monotonic() + timeout_s
    while line.encode() not in (text := path.read_bytes())[after:]:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not log {line!r} within {timeout_s}s\n{processes.logs()}")
        await anyio.sleep(0.05)
    return len(text)


async def test_killing_every_worker_of_a_region_moves_new_work_to_the_other_and_a_pinned_task_waits_for_its_region(
    settings: Settings, bus: Bus, processes: Processes
):
    two = msgspec.structs.replace(settings, regions=("eu", "us"), worker_heartbeat_s=HEARTBEAT_S)
    await streams.apply(bus, two)
    processes.env.update(STREAMSCHED_REGIONS="eu,us", STREAMSCHED_WORKER_HEARTBEAT_S=str(HEARTBEAT_S))
    for role in ("master", "projector"):
        processes.start(role, role)
    for region in two.regions:
        processes.start(f"regional-{region}", "regional", "--region", region)
    start_worker(processes, "worker-eu", "eu")
    us_worker = start_worker(processes, "worker-us", "us")
    client = Client(bus, await StateStore.open(bus), settings=two)

    await regions_until(client, lambda found: found["eu"].healthy and found["us"].healthy, what="both regions healthy")
    seen = await logged(processes, "master", "healthy regions: eu, us;")
    for n in range(20):
        await client.submit("echo", n, id=f"before-{n}")
    for n in range(20):
        assert (await client.wait(f"before-{n}", timeout_s=30)).status is Status.SUCCEEDED

    killed_at = time.monotonic()
    processes.started["worker-eu"].send_signal(signal.SIGKILL)
    seen = await logged(processes, "master", "healthy regions: us; not: eu (no live worker)", after=seen)
    noticed_s = time.monotonic() - killed_at
    assert noticed_s < 8 * HEARTBEAT_S + 1.0, f"the master noticed after {noticed_s:.1f}s"

    for n in range(20):
        await client.submit("echo", n, id=f"after-{n}")
    after = [await client.wait(f"after-{n}", timeout_s=30) for n in range(20)]
    assert {(state.status, state.region, state.worker) for state in after} == {(Status.SUCCEEDED, "us", us_worker)}

    # The command shows what the schedulers last reported: on a loaded machine a report may
    # lag a heartbeat behind, so it is asked again until the deadline.
    deadline = time.monotonic() + 20
    while True:
        listed = await anyio.run_process([sys.executable, "-m", "streamsched", "regions", "list", "--json"], env=processes.env)
        by_region = {line["region"]: line for line in map(json.loads, listed.stdout.decode().splitlines())}
        eu = (by_region["eu"]["healthy"], by_region["eu"]["problem"], by_region["eu"]["workers"])
        us = (by_region["us"]["healthy"], by_region["us"]["workers"], by_region["us"]["capacity"])
        if (eu, us) == ((False, "no live worker", 0), (True, 1, 4)) or time.monotonic() > deadline:
            break
        await anyio.sleep(0.5)
    assert eu == (False, "no live worker", 0)
    assert us == (True, 1, 4)

    await client.submit("echo", "pinned", id="pinned-to-eu", region="eu")
    deadline = time.monotonic() + 20
    while (state := await client.get("pinned-to-eu")) is None or state.stranded is None:
        assert time.monotonic() < deadline, f"no reason in the state of the pinned task: {state}"
        await anyio.sleep(0.05)
    assert state.stranded == "region eu has no live worker; waiting there (region_failover wait)" and state.region == "eu"
    assert state.status in (Status.PENDING, Status.SCHEDULED, Status.WAITING)  # WAITING once held on WORK (no eu worker)

    eu_again = start_worker(processes, "worker-eu-again", "eu")
    ran = await client.wait("pinned-to-eu", timeout_s=30)
    assert (ran.status, ran.region, ran.worker, ran.stranded) == (Status.SUCCEEDED, "eu", eu_again, None)
    await logged(processes, "master", "healthy regions: eu, us;", after=seen)
