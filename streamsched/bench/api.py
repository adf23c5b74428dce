"""``bench api``: listing tasks through the REST API with many tasks in the system.

KV ``tasks`` is filled with ``n`` task states (1 % failed, the rest succeeded, a tenth
waiting; written straight to the bucket, as the projector writes them, since the list is
read from there), then ``streamsched api`` is started as its own process. Reported: how
long its task list takes to load, its RSS, and the latency of list requests, each
``requests`` times in a row: ``status=failed&limit=50`` (the target's), the first page of
the biggest status, a page deep into it by cursor, and a label filter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import httpx
import msgspec
import psutil

from ..model import Status, TaskState
from ..transport.server import free_port
from .harness import percentiles, system, wait_until

TASKS = 100_000
REQUESTS = 200


def _state(i: int, now: float) -> TaskState:
    status = Status.FAILED if i % 100 == 0 else Status.WAITING if i % 10 == 1 else Status.SUCCEEDED
    at = now - TASKS + i  # one a second, oldest first
    return TaskState(
        id=f"bench-{i:07d}",
        status=status,
        type=("email.send", "report.build", "noop")[i % 3],
        priority="medium",
        region="default",
        labels={"tenant": f"t{i % 50}"},
        submitted_at=at,
        updated_at=at + 1,
        error="boom" if status is Status.FAILED else None,
    )


async def api(n: int = TASKS, requests: int = REQUESTS) -> dict[str, Any]:
    async with system() as sys_:
        now = time.time()
        bodies = ((f"$KV.tasks.bench-{i:07d}", msgspec.json.encode(_state(i, now)), None) for i in range(n))
        failed, first = await sys_.bus.publish_many(bodies)
        if failed:
            raise RuntimeError(f"{failed} states not written: {first!r}")
        port = free_port()
        env = dict(os.environ, NATS_URL=sys_.settings.nats_url)
        began = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "streamsched", "api", "--port", str(port), "--log-level", "WARNING"], env=env)
        sys_.processes["api"] = process
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as http:

            async def loaded() -> bool:
                try:
                    answer = await http.get("/api/v1/tasks", params={"limit": 1})
                except httpx.TransportError:
                    return False
                return answer.status_code == 200 and bool(answer.json()["tasks"])

            await wait_until(loaded, timeout_s=300, poll_s=0.1)
            load_s = time.monotonic() - began
            deep = (await http.get("/api/v1/tasks", params={"status": "succeeded", "limit": 1000})).json()["next_cursor"]
            queries = {
                "status=failed&limit=50": {"status": "failed", "limit": 50},
                "status=succeeded&limit=50": {"status": "succeeded", "limit": 50},
                "status=succeeded&limit=50, 1,000 deep": {"status": "succeeded", "limit": 50, "cursor": deep},
                "label=tenant=t7&limit=50": {"label": "tenant=t7", "limit": 50},
            }
            latency: dict[str, dict[str, float]] = {}
            for name, params in queries.items():
                took = []
                for _ in range(requests):
                    start = time.perf_counter()
                    answer = await http.get("/api/v1/tasks", params=params)
                    took.append(1000 * (time.perf_counter() - start))
                    if answer.status_code != 200 or len(answer.json()["tasks"]) != 50:
                        raise RuntimeError(f"{name}: {answer.status_code} {answer.text[:200]}")
                latency[name] = percentiles(took)
        rss_mb = psutil.Process(process.pid).memory_info().rss / 2**20
        return {"scenario": "api", "tasks": n, "requests": requests, "load_s": load_s, "api_rss_mb": rss_mb, "list_ms": latency}
