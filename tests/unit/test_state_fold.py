"""The projection fold: idempotent, and order-insensitive for the outcome."""

from __future__ import annotations

import random

import msgspec
import pytest

from streamsched.eventlog import events as ev
from streamsched.eventlog.state import fold
from streamsched.model import Status

LIFE = [
    ev.Submitted(task_id="t", at=1.0, type="echo", priority="high", region="eu", labels={"team": "a"}),
    ev.Scheduled(task_id="t", at=2.0, region="eu", priority="high"),
    ev.Dispatched(task_id="t", at=3.0, region="eu", priority="high"),
    ev.Started(task_id="t", at=4.0, attempt=1, worker="w1"),
    ev.Retrying(task_id="t", at=5.0, attempt=1, error="boom", delay_s=1.0),
    ev.Started(task_id="t", at=6.0, attempt=2, worker="w2"),
    ev.Succeeded(task_id="t", at=7.0, attempt=2, result=msgspec.Raw(b'{"ok":true}'), duration_s=1.0),
]


def replay(events):
    state = None
    for event in events:
        state = fold(state, event)
    return state


def test_a_full_life_ends_succeeded_with_every_fact_kept():
    state = replay(LIFE)
    assert state.status is Status.SUCCEEDED
    assert state.attempts == 2
    assert state.worker == "w2"
    assert state.error is None
    assert msgspec.json.decode(state.result) == {"ok": True}
    assert (state.submitted_at, state.scheduled_at, state.started_at, state.finished_at) == (1.0, 3.0, 6.0, 7.0)
    assert state.labels == {"team": "a"}


def test_the_same_event_applied_twice_changes_nothing():
    once = replay(LIFE)
    twice = replay([e for event in LIFE for e in (event, event)])
    assert msgspec.json.encode(once) == msgspec.json.encode(twice)


@pytest.mark.parametrize("seed", range(50))
def test_any_delivery_order_ends_in_the_same_state(seed):
    shuffled = LIFE[:] + LIFE[:4]
    random.Random(seed).shuffle(shuffled)
    assert msgspec.json.encode(replay(shuffled)) == msgspec.json.encode(replay(LIFE))


def test_a_late_retrying_event_does_not_roll_back_a_success():
    state = replay([*LIFE, ev.Retrying(task_id="t", at=9.0, attempt=1, error="late", delay_s=1.0)])
    assert state.status is Status.SUCCEEDED
    assert state.error is None


def test_dead_keeps_the_last_error():
    state = replay([LIFE[0], ev.Started(task_id="t", at=2.0, attempt=3, worker="w"), ev.Dead(task_id="t", at=3.0, attempt=3, error="E")])
    assert (state.status, state.error, state.attempts) == (Status.DEAD, "E", 3)


def test_events_round_trip_through_json_with_their_kind():
    for event in LIFE:
        decoded = ev.decode(ev.encode(event))
        assert decoded == event
        assert ev.kind(decoded) in ev.KINDS


def test_an_events_message_is_a_json_array_of_events_of_any_tasks():
    other = ev.Scheduled(task_id="u", at=1.5, region="r", priority="high")
    subject, body = ev.message([LIFE[-2], other, LIFE[-1]], "worker")
    assert subject == "events.worker"
    assert ev.decode_all(body) == [LIFE[-2], other, LIFE[-1]]
    # A message of one event, as earlier versions wrote them, reads the same.
    assert ev.decode_all(ev.encode(LIFE[0])) == [LIFE[0]]


def test_a_rejected_resubmission_does_not_overwrite_an_accepted_task_with_the_same_id():
    rejected = ev.Rejected(task_id="t", at=2.5, reason="unknown region", original=b"{}")
    for order in ([*LIFE[:3], rejected, *LIFE[3:]], [rejected, *LIFE], [*LIFE, rejected]):
        state = replay(order)
        assert state.status is Status.SUCCEEDED and state.error is None
    alone = replay([rejected])
    assert (alone.status, alone.error) == (Status.REJECTED, "unknown region")
    assert replay([*LIFE[:2], rejected]).status is Status.PENDING


def test_the_fold_cost_bench_folds_each_no_op_task_to_succeeded() -> None:
    from streamsched.bench import fold_cost

    bodies = fold_cost.messages(tasks=3)
    decoded = [event for body in bodies for event in ev.decode_all(body)]
    assert len(decoded) == 15  # five events per task
    by_task = {}
    for event in decoded:
        by_task[event.task_id] = fold(by_task.get(event.task_id), event)
    assert [state.status for state in by_task.values()] == [Status.SUCCEEDED] * 3
    assert set(fold_cost.measure(rounds=2, tasks=3)) == {"decode", "fold", "encode"}
