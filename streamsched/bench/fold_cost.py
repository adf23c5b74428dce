"""CPU per task of the projector's own steps: decoding events, folding them, encoding the state.

``python -m streamsched.bench.fold_cost``: a no-op task's five events (``submitted`` and
``scheduled`` from the master, ``dispatched`` from the regional scheduler, ``started``
and ``succeeded`` from the worker), in messages of 64 tasks as a loaded role records
them, decoded, folded into one state per task and the state encoded, each step timed on
its own. No server: only the Python the projector runs per task besides messaging.
"""

from __future__ import annotations

import time

import msgspec

from ..eventlog import events as ev
from ..eventlog.state import encode_state, fold

TASKS = 64
ROUNDS = 300


def messages(tasks: int = TASKS) -> list[bytes]:
    """The three events messages of ``tasks`` no-op tasks, one per recording role."""
    ids = [f"01JD{i:022d}" for i in range(tasks)]
    region, priority, worker_id = "default", "medium", "host-12345"
    master = [
        e
        for i in ids
        for e in (
            ev.Submitted(task_id=i, at=1.0, type="noop", region=region, priority=priority),
            ev.Scheduled(task_id=i, at=1.0, region=region, priority=priority),
        )
    ]
    regional = [ev.Dispatched(task_id=i, at=1.0, region=region, priority=priority) for i in ids]
    worker = [
        e
        for i in ids
        for e in (
            ev.Started(task_id=i, at=1.0, attempt=1, region=region, worker=worker_id),
            ev.Succeeded(task_id=i, at=1.0, attempt=1, region=region, worker=worker_id, result=msgspec.Raw(b"null"), duration_s=0.001),
        )
    ]
    return [ev.encode(events) for events in (master, regional, worker)]


def measure(rounds: int = ROUNDS, tasks: int = TASKS) -> dict[str, float]:
    """µs of CPU per task for each step."""
    bodies = messages(tasks)
    began = time.process_time()
    for _ in range(rounds):
        decoded = [ev.decode_all(body) for body in bodies]
    decode_s = time.process_time() - began
    by_task: dict[str, list[ev.Event]] = {}
    for message_events in decoded:
        for recorded in message_events:
            by_task.setdefault(recorded.task_id, []).append(recorded)
    began = time.process_time()
    for _ in range(rounds):
        states = []
        for task_events in by_task.values():
            state = None
            for event in task_events:
                state = fold(state, event)
            assert state is not None
            states.append(state)
    fold_s = time.process_time() - began
    began = time.process_time()
    for _ in range(rounds):
        for state in states:
            encode_state(state)
    encode_s = time.process_time() - began
    per_task = 1e6 / (rounds * tasks)
    return {"decode": decode_s * per_task, "fold": fold_s * per_task, "encode": encode_s * per_task}


if __name__ == "__main__":
    print(", ".join(f"{step} {us:.2f}" for step, us in measure().items()), "µs per task")
