"""The projection fold: idempotent, and order-insensitive for the outcome."""

from __future__ import annotations

import random

import msgspec
import pytest

from streamsched.eventlog import events as ev
from streamsched.eventlog.state import fold, is_final
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


# Kinds that nothing records yet (delays and dependencies, handler progress, cancel, dynamic
# priorities): what the fold does with each is settled before the code that records them.
WAITING = ev.Waiting(task_id="t", at=1.5, on=["u"], until=9.0)
REPRIORITIZED = ev.Reprioritized(task_id="t", at=2.5, priority="low", previous="high")
PROGRESS = ev.Progress(task_id="t", at=6.5, attempt=2, fraction=0.5, message="half way")
CANCELLED = ev.Cancelled(task_id="t", at=3.5, reason="not needed")
NOT_EMITTED_YET = [WAITING, REPRIORITIZED, PROGRESS, CANCELLED]


def encoded(events) -> bytes:
    return msgspec.json.encode(replay(events))


@pytest.mark.parametrize("event", NOT_EMITTED_YET, ids=ev.kind)
@pytest.mark.parametrize("after", [1, 3, 6, len(LIFE)])
def test_each_kind_nothing_emits_yet_folded_twice_changes_nothing(event, after):
    assert encoded([*LIFE[:after], event, event]) == encoded([*LIFE[:after], event])


@pytest.mark.parametrize("seed", range(30))
def test_a_life_with_every_such_kind_ends_in_the_same_state_in_any_delivery_order(seed):
    life = [LIFE[0], WAITING, LIFE[1], REPRIORITIZED, CANCELLED, *LIFE[2:6], PROGRESS, LIFE[6]]
    shuffled = life[:]
    random.Random(seed).shuffle(shuffled)
    assert encoded(shuffled) == encoded(life)
    state = replay(shuffled)
    # The cancel (of attempt 0) lost the race to attempt 2's success.
    assert (state.status, state.error, state.finished_at) == (Status.SUCCEEDED, None, 7.0)
    assert (state.priority, state.progress) == ("low", 0.5)


def test_waiting_holds_a_submitted_task_until_it_is_scheduled():
    assert replay([LIFE[0], WAITING]).status is Status.WAITING
    # Before its submission (out of order) it waits too, and the submission's facts come in.
    state = replay([WAITING, LIFE[0]])
    assert (state.status, state.type, state.submitted_at) == (Status.WAITING, "echo", 1.0)
    # Released: scheduled ranks above waiting, in either order of arrival.
    assert replay([LIFE[0], WAITING, LIFE[1]]).status is Status.PENDING
    assert replay([LIFE[1], WAITING, LIFE[0]]).status is Status.PENDING


@pytest.mark.parametrize("position", range(len(LIFE) + 1))
def test_a_waiting_event_anywhere_in_the_life_changes_neither_its_steps_nor_its_end(position):
    assert replay([*LIFE[:3], WAITING]).status is Status.SCHEDULED  # late: no step back to waiting
    with_waiting = replay([*LIFE[:position], WAITING, *LIFE[position:]])
    assert (with_waiting.waiting_on, with_waiting.not_before) == (["u"], 9.0)
    with_waiting.waiting_on, with_waiting.not_before = [], None
    assert msgspec.json.encode(with_waiting) == encoded(LIFE)


def test_progress_keeps_the_attempt_running_and_fills_its_fraction():
    state = replay([*LIFE[:6], PROGRESS])
    assert (state.status, state.progress, state.attempts, state.worker) == (Status.RUNNING, 0.5, 2, "w2")
    # Ahead of its attempt's start (out of order): running already, and the start's facts still come in.
    state = replay([*LIFE[:5], PROGRESS, LIFE[5]])
    assert (state.status, state.progress, state.started_at, state.worker) == (Status.RUNNING, 0.5, 6.0, "w2")


def test_progress_of_an_earlier_attempt_or_after_the_outcome_changes_no_status():
    earlier = ev.Progress(task_id="t", at=4.5, attempt=1, fraction=0.9)
    state = replay([*LIFE[:6], earlier])
    assert (state.status, state.progress) == (Status.RUNNING, None)
    assert replay([*LIFE, PROGRESS]).status is Status.SUCCEEDED


def test_a_progress_message_without_a_fraction_keeps_the_last_fraction():
    message_only = ev.Progress(task_id="t", at=6.8, attempt=2, message="still going")
    assert replay([*LIFE[:6], PROGRESS, message_only]).progress == 0.5


def test_a_cancelled_task_is_final_with_its_reason_and_keeps_later_arriving_facts():
    state = replay([*LIFE[:3], CANCELLED])
    assert (state.status, state.error, state.finished_at) == (Status.CANCELLED, "not needed", 3.5)
    assert is_final(state)
    # Earlier steps folded after it fill their facts without moving the status back.
    state = replay([CANCELLED, *LIFE[:3]])
    assert (state.status, state.submitted_at, state.scheduled_at, state.type) == (Status.CANCELLED, 1.0, 3.0, "echo")
    assert replay([ev.Cancelled(task_id="t", at=1.0)]).error == "cancelled"


def test_a_cancel_that_lost_the_race_to_an_outcome_leaves_that_outcome_alone():
    for order in ([*LIFE, CANCELLED], [CANCELLED, *LIFE]):
        state = replay(order)
        assert (state.status, state.error, state.finished_at) == (Status.SUCCEEDED, None, 7.0)


@pytest.mark.parametrize("after", range(1, len(LIFE) + 1))
def test_reprioritized_at_the_current_attempt_changes_the_priority_never_the_status(after):
    state = replay(LIFE[:after])
    before = (state.status, state.rank, state.updated_at, state.attempts)
    moved = ev.Reprioritized(task_id="t", at=9.0, attempt=state.attempts, priority="low", previous="high")
    state = fold(state, moved)
    assert (state.status, state.rank, state.updated_at, state.attempts) == before
    assert (state.priority, state.priority_changed_at) == ("low", 9.0)


def test_a_reprioritized_task_keeps_its_new_priority_against_late_and_earlier_events():
    # The submission and routing carry the old priority; folded after the change, they keep it.
    for order in ([LIFE[0], REPRIORITIZED, *LIFE[1:3]], [REPRIORITIZED, *LIFE[:3]], [*LIFE[:3], REPRIORITIZED]):
        assert replay(order).priority == "low"
    # Of two changes, the later one wins in either order.
    older = ev.Reprioritized(task_id="t", at=2.0, priority="medium", previous="high")
    for order in ([LIFE[0], older, REPRIORITIZED], [LIFE[0], REPRIORITIZED, older]):
        state = replay(order)
        assert (state.priority, state.priority_changed_at) == ("low", 2.5)
