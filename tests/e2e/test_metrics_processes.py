"""A role process started with `--metrics-port` serves its own /metrics, counting what it did."""

from __future__ import annotations

import contextlib
import time

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamsched.client import Client
from streamsched.transport.server import free_port

from .conftest import Processes

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def completed(text: str, task_type: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tasks_completed_total" and sample.labels.get("type") == task_type
    )


async def test_a_worker_process_serves_its_counts_on_its_metrics_port(client: Client, schedulers, processes: Processes):
    port = free_port()
    processes.start("worker", "worker", "workers.examples", "--region", "default", "--concurrency", "4", "--metrics-port", str(port))
    for n in range(4):
        await client.submit("echo", n, id=f"counted-{n}")
    for n in range(4):
        assert (await client.wait(f"counted-{n}", timeout_s=20)).status == "succeeded", processes.logs()
    deadline = time.monotonic() + 10
    text = ""
    async with httpx.AsyncClient(timeout=2) as http:
        while completed(text, "echo") < 4:
            assert time.monotonic() < deadline, f"no scrape counted 4 echo tasks:\n{text[-2000:]}\n{processes.logs()}"
            with contextlib.suppress(httpx.TransportError):  # not serving yet
                text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            await anyio.sleep(0.05)
    assert completed(text, "echo") == 4
    assert "process_resident_memory_bytes" in text and "worker_tasks_running" in text
