"""`streamsched up`, the README's quick start: one command runs everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest

from streamsched.transport.server import free_port

from ..conftest import REPO

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_up_runs_the_whole_system_and_stops_cleanly_on_sigint(tmp_path: Path):
    import nats

    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "streamsched", "up", "--port", str(port), "--monitor-port", "0", "--data-dir", str(tmp_path / "data")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        nc = None
        deadline = time.monotonic() + 30
        while nc is None and time.monotonic() < deadline:
            try:
                nc = await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=0, connect_timeout=0.5)
            except Exception:  # noqa: BLE001 - not up yet
                await anyio.sleep(0.1)
        assert nc is not None, "streamsched up did not start nats-server"
        outcomes: dict[str, str] = {}

        async def record(msg):
            # What any NATS client sees: a JSON array of events (of several tasks) per message.
            for event in json.loads(msg.data):
                if event["kind"] in ("succeeded", "rejected", "dead", "failed"):
                    outcomes[event["task_id"]] = event["kind"]

        await nc.subscribe("events.>", cb=record)
        await nc.flush()
        # Exactly what `nats pub` sends: a plain core publish, no headers.
        for i in range(100):
            priority = ("high", "medium", "low")[i % 3]
            await nc.publish("tasks.submit", json.dumps({"id": f"u{i}", "type": "echo", "priority": priority}).encode())
        for _ in range(5):
            await nc.publish("tasks.submit", b"this is not json")
        await nc.flush()
        deadline = time.monotonic() + 60
        while len(outcomes) < 105 and time.monotonic() < deadline:
            await nc.flush()
            await anyio.sleep(0.05)
        await nc.close()
        assert sum(1 for k in outcomes.values() if k == "succeeded") == 100
        assert sum(1 for k in outcomes.values() if k == "rejected") == 5
        # The projector yields the cores to the task pipeline (settings.projector_nice); the rest do not.
        base = os.nice(0)
        niceness = {
            child.cmdline()[3]: child.nice() for child in psutil.Process(up.pid).children() if child.cmdline()[1:3] == ["-m", "streamsched"]
        }
        assert niceness == {"master": base, "regional": base, "projector": min(19, base + 10), "worker": base}, niceness
    finally:
        up.send_signal(signal.SIGINT)
        try:
            output = up.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            up.kill()
            output = up.communicate()[0].decode()
    assert up.returncode == 0, output[-3000:]
    assert f"nats://127.0.0.1:{port}" in output and "nats pub tasks.submit" in output
