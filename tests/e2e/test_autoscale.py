"""`streamsched up --autoscale MIN:MAX`: workers follow the WORK backlog, and scaling down
drains a worker, so every task still succeeds once."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from streamsched.cli import Exit

from ..conftest import REPO
from .test_up import UP, UpProcess, connect, running_up

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TASKS = 20
#: Small thresholds and ticks so that the test takes seconds: two busy samples half a second
#: apart add workers; two idle seconds drain one.
AUTOSCALE = {
    "STREAMSCHED_AUTOSCALE_TICK_S": "0.5",
    "STREAMSCHED_AUTOSCALE_UP_TICKS": "2",
    "STREAMSCHED_AUTOSCALE_IDLE_S": "2",
}


async def wait_for(condition: Callable[[], bool], what: str, up: UpProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert up.popen.poll() is None, f"up exited with {up.popen.returncode}:\n{up.output[-3000:]}"
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}\n{up.output[-4000:]}"
        await anyio.sleep(0.05)


async def test_workers_scale_up_under_a_backlog_of_slow_tasks_and_drain_back_to_min_when_idle(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCHED_")} | AUTOSCALE
    with running_up(tmp_path, "--autoscale", "1:3", "--concurrency", "2", env=env) as (up, port):
        up.wait_for_line(lambda line: "streamsched.worker: worker" in line and "handlers echo" in line)
        assert len(up.roles("worker")) == 1
        nc = await connect(port)
        kinds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

        async def record(msg):
            for event in json.loads(msg.data):
                kinds[event["task_id"]][event["kind"]] += 1

        await nc.subscribe("events.>", cb=record)
        await nc.flush()
        # 20 one-second tasks for 2 slots: 10 s with one worker, a backlog the whole time.
        for n in range(TASKS):
            await nc.publish("tasks.submit", json.dumps({"id": f"slow{n}", "type": "sleep", "payload": {"seconds": 1.0}}).encode())
        await nc.flush()
        most: list[int] = [1]

        def workers_running(count: int) -> Callable[[], bool]:
            def check() -> bool:
                running = len(up.roles("worker"))
                most[0] = max(most[0], running)
                return running == count

            return check

        await wait_for(workers_running(3), "3 workers under the backlog", up, timeout_s=30)
        await wait_for(lambda: sum(k["succeeded"] for k in kinds.values()) >= TASKS, f"{TASKS} tasks succeeded", up, timeout_s=60)
        await wait_for(workers_running(1), "back to 1 worker when idle", up, timeout_s=40)
        await wait_for(lambda: "worker default#2 retired" in up.output, "the second worker retired", up, timeout_s=10)
        await nc.close()
        assert len(up.roles("worker")) == 1 and most[0] == 3, most
    assert up.popen.returncode == 0, up.output[-3000:]

    output = up.output
    assert sorted(kinds) == sorted(f"slow{n}" for n in range(TASKS))
    for task_id, counts in kinds.items():
        assert counts["succeeded"] == 1, (task_id, counts)
        assert not counts.keys() & {"failed", "dead", "retrying", "cancelled"}, (task_id, counts)
    # Scaling down drained each worker it took out: it exited 0 and was not started again.
    for n in (2, 3):
        assert f"worker default#{n} started" in output
        assert f"worker default#{n} (pid " in output and ") draining" in output, output[-4000:]
        assert f"worker default#{n} retired: exited cleanly" in output, output[-4000:]
        assert f"worker default#{n} restarted" not in output and f"worker default#{n} exited" not in output
    assert "took no drain request" not in output and "sending SIGTERM" not in output and "killing it" not in output
    assert "adding 2 worker(s)" in output and output.count("draining one") == 2
    assert "workers per region: 1 to 3 (autoscaled) x 2 slots" in output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--autoscale", "3:1"], "MIN (3) must not exceed MAX (1)"),
        (["--autoscale", "0:2"], "MIN must be at least 1"),
        (["--autoscale", "two"], "expected MIN:MAX"),
        (["--autoscale", "1:2", "--workers", "2"], "give --workers or --autoscale, not both"),
    ],
)
def test_bad_autoscale_bounds_are_a_usage_error_before_anything_starts(tmp_path: Path, args: list[str], says: str):
    result = subprocess.run([*UP, "--data-dir", str(tmp_path / "data"), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == Exit.USAGE, result.stdout + result.stderr
    assert f"Invalid value for '--autoscale': {says}" in result.stderr
    assert not (tmp_path / "data").exists(), "nats-server was started anyway"
