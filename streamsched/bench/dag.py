"""``bench dag``: a random DAG of no-op tasks, and a split fanned out into chunks.

The DAG: task ``i`` depends on up to three tasks drawn from those before it, and the
whole graph is submitted in random order, so most dependants are registered before their
dependencies exist. Reported: tasks/s from the first submission to the last success, and
the latency of a dependency edge, from the success of a task's last dependency (or its
own submission, when that came later) to its own start (each event's ``at``, written by
the same host's clock). At full speed every role is busy and an edge's latency is mostly
queueing, so more tasks follow at a steady rate, each run once the one before has settled:

* a DAG a fifth the size at half the full speed (as ``bench latency`` measures plain
  tasks at half their maximum rate), and one at 250 tasks/s, the rate of the plain
  latency target. Both are one graph in random order: the tasks submitted last complete
  the ancestry of hundreds of others, which then become ready within a few milliseconds
  of each other (the *largest burst* reported), so their edges wait in queues too;
* as many tasks at 250 tasks/s as ten-task random DAGs, each submitted in random order
  (the workload of many small workflows): every dependant is registered before its
  dependencies run and at most a few become ready at once. The target judges these
  edges: the latency the dependency machinery adds where queues do not dominate.

The split: one task fanned out into ``chunks`` chunk tasks whose gather receives every
result; reported: its time from submission to the parent's success, and chunks/s.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import msgspec

from .. import subjects
from .harness import CpuMeter, Roles, finished_count, percentiles, projector_caught_up, read_events, submit, system, wait_until

#: Dependencies per task at most.
MAX_DEPENDENCIES = 3
#: Target: a dependant starts within this long of its last dependency's success, p99 (ms),
#: judged at :data:`PACED_RATE`.
EDGE_P99_MS = 20.0
#: Tasks/s of the paced runs: the rate of the plain latency target.
PACED_RATE = 250.0
#: Tasks in each of the small DAGs whose edges the target judges.
WORKFLOW_SIZE = 10
#: Tasks that become ready within this long of each other count as one burst (s).
BURST_WINDOW_S = 0.010


def random_dag(n: int, seed: int) -> dict[str, list[str]]:
    """Each task's dependencies: up to :data:`MAX_DEPENDENCIES` of the tasks before it."""
    rng = random.Random(seed)
    graph: dict[str, list[str]] = {}
    for i in range(n):
        count = min(i, rng.randint(0, MAX_DEPENDENCIES))
        graph[f"d{i}"] = [f"d{j}" for j in rng.sample(range(i), count)]
    return graph


def small_dags(n: int, size: int, seed: int) -> dict[str, list[str]]:
    """``n // size`` independent random DAGs of ``size`` tasks each (ids ``w<k>_<i>``)."""
    graph: dict[str, list[str]] = {}
    for k in range(n // size):
        for task, deps in random_dag(size, seed + k).items():
            graph[f"w{k}_{task[1:]}"] = [f"w{k}_{d[1:]}" for d in deps]
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
    """The DAG at full speed (tasks/s; its edges wait in queues, since it keeps every role
    busy), then two a fifth its size at half that rate and at 250 tasks/s, then as many
    tasks at 250 tasks/s as small DAGs (the edges the target judges: the latency a
    dependency adds where queues do not dominate), then the split."""
    roles = (roles or Roles()).resolved()
    full_graph = random_dag(n, seed)
    paced_graph = _renamed(random_dag(max(1, n // 5), seed + 2), "p")
    workflows_graph = small_dags(max(WORKFLOW_SIZE, n // 5), WORKFLOW_SIZE, seed + 3)
    async with system(roles=roles) as sys_:
        sys_.start_roles(roles)
        base = await finished_count(sys_.bus)
        meter = CpuMeter(sys_.role_pids()).start()
        began = time.monotonic()
        submit_s = await submit(sys_.bus, _bodies(full_graph, seed))
        done = await wait_until(lambda: _at_least(sys_.bus, base + n), timeout_s=600)
        cpu = meter.stop()
        tasks_per_s = n / (done - began)
        half_graph = _renamed(paced_graph, "h")
        expected = n
        runs = ((half_graph, tasks_per_s / 2, None), (paced_graph, PACED_RATE, None), (workflows_graph, PACED_RATE, WORKFLOW_SIZE))
        for graph, rate, block in runs:
            # Each paced run starts once the one before has settled (run, projected, resolved):
            # its figures are those of the rate, not of catching up with a burst.
            await wait_until(lambda: _settled(sys_.bus), timeout_s=600)
            await _submit_paced(sys_.bus, _bodies(graph, seed, block), rate)
            expected += len(graph)
            await wait_until(lambda: _at_least(sys_.bus, base + expected), timeout_s=600)  # noqa: B023 - awaited here
        at = {kind: await _times(sys_.bus, kind, expected) for kind in ("submitted", "scheduled", "started", "succeeded")}
        result: dict[str, Any] = {
            "scenario": "dag",
            "n": n,
            "roles": vars(roles),
            "edges": sum(map(len, full_graph.values())),
            "submit_s": submit_s,
            "tasks_per_s": tasks_per_s,
            "cpu_us_per_task": {k: 1e6 * v / n for k, v in cpu.items()},
            **_edge_figures(full_graph, at),
            "half_speed": {"n": len(half_graph), "rate_per_s": tasks_per_s / 2, **_edge_figures(half_graph, at)},
            "paced": {"n": len(paced_graph), "rate_per_s": PACED_RATE, **_edge_figures(paced_graph, at)},
            "workflows": {"n": len(workflows_graph), "size": WORKFLOW_SIZE, "rate_per_s": PACED_RATE, **_edge_figures(workflows_graph, at)},
            "edge_target_ms": EDGE_P99_MS,
        }
        if chunks:
            result["split"] = await _split(sys_.bus, chunks)
        return result


def _renamed(graph: dict[str, list[str]], prefix: str) -> dict[str, list[str]]:
    return {prefix + task[1:]: [prefix + d[1:] for d in deps] for task, deps in graph.items()}


async def _submit_paced(bus: Any, bodies: list[bytes], rate: float) -> None:
    """Submit ``bodies`` at ``rate`` tasks/s (open loop: each at its time, whatever came before)."""
    slot = time.monotonic()
    for i, body in enumerate(bodies):
        delay = slot + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await bus.publish(subjects.SUBMIT, body)


def _bodies(graph: dict[str, list[str]], seed: int, block: int | None = None) -> list[bytes]:
    """The graph's submissions in random order (within each run of ``block`` tasks, when
    given: one small DAG after another): most dependants come before their dependencies."""
    rng = random.Random(seed + 1)
    tasks = list(graph)
    order: list[str] = []
    for start in range(0, len(tasks), block or len(tasks) or 1):
        part = tasks[start : start + (block or len(tasks))]
        rng.shuffle(part)
        order += part
    return [msgspec.json.encode({"id": task, "type": "noop", "depends_on": graph[task]}) for task in order]


async def _times(bus: Any, kind: str, expected: int) -> dict[str, float]:
    """Each task's time of its last ``kind`` event (a dependant's ``scheduled`` is its release;
    a copy recorded again comes later still)."""
    times: dict[str, float] = {}
    for event in await read_events(bus, kind, expected=expected):
        times[event.task_id] = max(event.at, times.get(event.task_id, 0.0))
    return times


def _edge_figures(graph: dict[str, list[str]], at: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The edges' latency, and its two parts: until the dependant is placed on SCHED, then until it starts."""
    ready = ready_at(graph, at["submitted"], at["succeeded"])
    started, scheduled = at["started"], at["scheduled"]
    return {
        "largest_burst": largest_burst(list(ready.values()), BURST_WINDOW_S),
        "edge_latency_ms": percentiles(latencies_ms(ready, started)),
        "release_ms": percentiles(latencies_ms(ready, scheduled)),
        "release_to_start_ms": percentiles([1000 * (started[t] - scheduled[t]) for t in ready if t in started and t in scheduled]),
    }


def largest_burst(times: list[float], window_s: float) -> int:
    """Most of ``times`` within ``window_s`` of each other."""
    ordered = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(ordered):
        while at - ordered[first] > window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


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


async def _settled(bus: Any) -> bool:
    """The projector has folded every event and the resolvers every notice."""
    resolver = await bus.js.consumer_info(subjects.FINISHED_STREAM, subjects.RESOLVER_CONSUMER)
    return await projector_caught_up(bus) and resolver.num_pending == 0 and resolver.num_ack_pending == 0


async def _at_least(bus: Any, count: int) -> bool:
    return await finished_count(bus) >= count
