"""``bench api``: listing tasks and reading a task's events through the REST API with many
tasks in the system.

KV ``tasks`` is filled with ``n`` task states (1 % failed, the rest succeeded, a tenth
waiting; written straight to the bucket, as the projector writes them, since the list is
read from there), and EVENTS with ``history_tasks`` tasks' events (``submitted`` and
``succeeded``, 64 tasks to a message, as the recorder writes them under load); the states
of the oldest and newest hundred of those tasks note their messages, as the projector
notes them. Then ``streamsched api`` is started as its own process. Reported: how long its
task list takes to load, its RSS, and the latency of requests, each ``requests`` times in
a row: lists (``status=failed&limit=50``, the target's; the first page of the biggest
status; a page deep into it by cursor; a label filter) and ``GET /api/v1/tasks/{id}/events``
of an old task and of a new one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import msgspec
import psutil

from .. import subjects
from ..eventlog import events as ev
from ..model import Status, TaskState
from ..transport.server import free_port
from .harness import percentiles, system, wait_until

TASKS = 100_000
REQUESTS = 200
#: Tasks whose events fill EVENTS, and how many share a message.
HISTORY_TASKS = 1_000_000
PER_MESSAGE = 64
#: Tasks of each end of EVENTS whose history is read.
SAMPLED = 100


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


async def _fill_events(bus: Any, tasks: int, now: float) -> dict[str, int]:
    """EVENTS with ``tasks`` tasks' events; returns the sequence of the message of each sampled task."""
    seq_of: dict[str, int] = {}
    sampled = set(range(SAMPLED)) | set(range(tasks - SAMPLED, tasks))
    for start in range(0, tasks, PER_MESSAGE * 100):
        bodies = []
        for first in range(start, min(tasks, start + PER_MESSAGE * 100), PER_MESSAGE):
            events: list[ev.Event] = []
            for i in range(first, min(tasks, first + PER_MESSAGE)):
                at = now - tasks + i
                events += [
                    ev.Submitted(task_id=f"hist-{i:07d}", at=at, type="noop", priority="medium", region="default"),
                    ev.Succeeded(task_id=f"hist-{i:07d}", at=at + 0.001, attempt=1, region="default", worker="bench"),
                ]
            bodies.append(ev.message(events, "bench"))
        futures = [await bus.publish(subject, body) for subject, body in bodies]
        acks = await asyncio.gather(*futures)
        for index, ack in enumerate(acks):
            first = start + index * PER_MESSAGE
            for i in range(first, min(tasks, first + PER_MESSAGE)):
                if i in sampled:
                    seq_of[f"hist-{i:07d}"] = ack["seq"]
    return seq_of


async def api(n: int = TASKS, requests: int = REQUESTS, history_tasks: int = HISTORY_TASKS) -> dict[str, Any]:
    async with system() as sys_:
        now = time.time()
        bodies = ((f"$KV.tasks.bench-{i:07d}", msgspec.json.encode(_state(i, now)), None) for i in range(n))
        failed, first = await sys_.bus.publish_many(bodies)
        if failed:
            raise RuntimeError(f"{failed} states not written: {first!r}")
        seq_of = await _fill_events(sys_.bus, history_tasks, now)
        states = (
            (f"$KV.tasks.{task_id}", msgspec.json.encode(TaskState(id=task_id, status=Status.SUCCEEDED, type="noop", event_seqs=[seq])), None)
            for task_id, seq in seq_of.items()
        )
        failed, first = await sys_.bus.publish_many(states)
        if failed:
            raise RuntimeError(f"{failed} states not written: {first!r}")
        events_in_stream = (await sys_.bus.js.stream_info(subjects.EVENTS_STREAM)).state
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
            ids = sorted(seq_of)
            history: dict[str, dict[str, float]] = {}
            for name, chosen in (("an old task (first in EVENTS)", ids[:SAMPLED]), ("a new task (last in EVENTS)", ids[-SAMPLED:])):
                took = []
                for turn in range(requests):
                    start = time.perf_counter()
                    answer = await http.get(f"/api/v1/tasks/{chosen[turn % len(chosen)]}/events")
                    took.append(1000 * (time.perf_counter() - start))
                    if answer.status_code != 200 or [event["kind"] for event in answer.json()] != ["submitted", "succeeded"]:
                        raise RuntimeError(f"history of {chosen[turn % len(chosen)]}: {answer.status_code} {answer.text[:200]}")
                history[name] = percentiles(took)
        rss_mb = psutil.Process(process.pid).memory_info().rss / 2**20
        return {
            "scenario": "api",
            "tasks": n,
            "requests": requests,
            "load_s": load_s,
            "api_rss_mb": rss_mb,
            "list_ms": latency,
            "history_tasks": history_tasks,
            "events_in_stream": {"messages": events_in_stream.messages, "bytes": events_in_stream.bytes},
            "history_ms": history,
        }
