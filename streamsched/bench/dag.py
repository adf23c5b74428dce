"""``bench dag``: a random DAG of no-op tasks, and a split fanned out into chunks.

The DAG: task ``i`` depends on up to three tasks drawn from those before it, and the
whole graph is submitted in random order, so most dependants are registered before their
dependencies exist. Reported: tasks/s from the first submission to the last success, and
the added latency of a dependency edge, from the success of a task's last dependency (or
its own submission, when that came later) to its own start (each event's ``at``, written
by the same host's clock).

The split: one task fanned out into ``chunks`` chunk tasks whose gather receives every
result; reported: its time from submission to the parent's success, and chunks/s.
"""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec

from .harness import CpuMeter, Roles, finished_count, percentiles, read_events, submit, system, wait_until

#: Dependencies per task at most.
MAX_DEPENDENCIES = 3
#: Target: a dependant starts within this long of its last dependency's success, p99 (ms).
EDGE_P99_MS = 20.0


def random_dag(n: int, seed: int) -> dict[str, list[str]]:
    """Each task's dependencies: up to :data:`MAX_DEPENDENCIES` of the tasks before it."""
    rng = random.Random(seed)
    graph: dict[str, list[str]] = {}
    for i in range(n):
        count = min(i, rng.randint(0, MAX_DEPENDENCIES))
        graph[f"d{i}"] = [f"d{j}" for j in rng.sample(range(i), count)]
    return graph


def ready_at(graph: dict[str, list[str]], submitted: dict[str, float], succeeded: dict[str, float]) -> dict[str, float]:
    """When each task with dependencies could start: once its last dependency succeeded, or
    once it was submitted when that came later (random order submits some tasks after their
    dependencies finished: waiting for the submission is not the edge's latency)."""
    return {task: max(submitted.get(task, 0.0), *(succeeded[d] for d in deps)) for task, deps in graph.items() if deps}


def latencies_ms(ready: dict[str, float], later: dict[str, float]) -> list[float]:
    """``later[task] - ready[task]`` in ms, for every task in both."""
    return [1000 * (later[task] - at) for task, at in ready.items() if task in later]


async def dag(n: int = 10_000, chunks: int = 1000, roles: Roles | None = None, seed: int = 1) -> dict[str, Any]:
    roles = (roles or Roles()).resolved()
    graph = random_dag(n, seed)
    order = list(graph)
    random.Random(seed + 1).shuffle(order)
    bodies = [msgspec.json.encode({"id": task, "type": "noop", "depends_on": graph[task]}) for task in order]
    async with system() as sys_:
        sys_.start_roles(roles)
        base = await finished_count(sys_.bus)
        meter = CpuMeter(sys_.role_pids()).start()
        began = time.monotonic()
        submit_s = await submit(sys_.bus, bodies)
        done = await wait_until(lambda: _at_least(sys_.bus, base + n), timeout_s=600)
        cpu = meter.stop()
        submitted = {e.task_id: e.at for e in await read_events(sys_.bus, "submitted", expected=n)}
        started = {e.task_id: e.at for e in await read_events(sys_.bus, "started", expected=n)}
        succeeded = {e.task_id: e.at for e in await read_events(sys_.bus, "succeeded", expected=n)}
        # A task's last `scheduled`: a dependant's release (a copy recorded again comes later still).
        scheduled: dict[str, float] = {}
        for e in await read_events(sys_.bus, "scheduled", expected=n):
            scheduled[e.task_id] = max(e.at, scheduled.get(e.task_id, 0.0))
        ready = ready_at(graph, submitted, succeeded)
        result: dict[str, Any] = {
            "scenario": "dag",
            "n": n,
            "roles": vars(roles),
            "edges": sum(map(len, graph.values())),
            "submit_s": submit_s,
            "tasks_per_s": n / (done - began),
            "cpu_us_per_task": {k: 1e6 * v / n for k, v in cpu.items()},
            "edge_latency_ms": percentiles(latencies_ms(ready, started)),
            # The two parts of an edge: until the dependant is placed on SCHED, then until it starts.
            "release_ms": percentiles(latencies_ms(ready, scheduled)),
            "release_to_start_ms": percentiles([1000 * (started[t] - scheduled[t]) for t in ready if t in started and t in scheduled]),
            "edge_target_ms": EDGE_P99_MS,
        }
        if chunks:
            result["split"] = await _split(sys_.bus, chunks)
        return result


async def _split(bus: Any, chunks: int) -> dict[str, Any]:
    body = msgspec.json.encode({"id": "split", "type": "noop", "split": {"range": [0, chunks * 100], "parts": chunks}})
    began = time.monotonic()
    await submit(bus, [body])
    store = await bus.js.key_value("tasks")

    async def finished() -> bool:
        try:
            entry = await store.get("split")
        except Exception:  # noqa: BLE001 - not projected yet
            return False
        return entry.value is not None and b'"status":"succeeded"' in entry.value

    done = await wait_until(finished, timeout_s=300)
    return {"chunks": chunks, "seconds": done - began, "chunks_per_s": chunks / (done - began)}


async def _at_least(bus: Any, count: int) -> bool:
    return await finished_count(bus) >= count
