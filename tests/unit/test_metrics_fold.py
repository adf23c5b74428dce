"""The fold behind the API's /metrics: each outcome counted once, labels kept per task,
bounded type labels and a bounded task map; and the role's cheap histogram."""

from __future__ import annotations

from streamsched.config import Settings
from streamsched.eventlog import events as ev
from streamsched.metrics import UNKNOWN, EventFold
from streamsched.roles.metrics import OTHER, SECONDS_BUCKETS, Buckets, TypeLabels


def run(fold: EventFold, task_id: str, task_type: str = "echo", *, at: float = 100.0, priority: str = "high", region: str = "eu") -> None:
    """A task's plain path: submitted, scheduled, dispatched, started, succeeded."""
    fold.observe(ev.Submitted(task_id=task_id, at=at, type=task_type, priority=priority, region=region))
    fold.observe(ev.Scheduled(task_id=task_id, at=at, priority=priority, region=region))
    fold.observe(ev.Dispatched(task_id=task_id, at=at + 0.5, priority=priority, region=region))
    fold.observe(ev.Started(task_id=task_id, at=at + 2.0, attempt=1, region=region))
    fold.observe(ev.Succeeded(task_id=task_id, at=at + 2.25, attempt=1, region=region, duration_s=0.2))


def count(fold: EventFold, name: str) -> int:
    return sum(fold.counts[name].values())


def test_a_task_is_counted_once_by_its_labels_and_timed() -> None:
    fold = EventFold(Settings())
    run(fold, "a")
    assert fold.counts["tasks_submitted"] == {("echo", "high", "eu"): 1}
    assert fold.counts["tasks_completed"] == {("echo", "high", "eu"): 1}  # the later events carry no type: the fold kept it
    assert fold.waits[("echo", "high", "eu")].counts[SECONDS_BUCKETS.index(2.5)] == 1  # submitted -> started: 2 s
    assert fold.durations[("echo", "high", "eu")].total == 0.2  # the worker's own measure
    assert set(fold.hops) == {"submitted_to_scheduled", "scheduled_to_dispatched", "dispatched_to_started", "started_to_succeeded"}
    assert fold.tasks == {}  # finished: no longer followed


def test_a_step_recorded_twice_is_counted_once() -> None:
    fold = EventFold(Settings())
    fold.observe(ev.Submitted(task_id="a", at=1.0, type="echo", priority="high", region="eu"))
    fold.observe(ev.Submitted(task_id="a", at=1.0, type="echo", priority="high", region="eu"))  # a redelivered submission
    fold.observe(ev.Cancelled(task_id="a", at=2.0, reason="by the canceller"))
    fold.observe(ev.Cancelled(task_id="a", at=3.0, attempt=1, reason="by the worker that met it"))
    fold.observe(ev.Rejected(task_id="b", at=1.0, reason="bad", original=b"{}"))
    fold.observe(ev.Rejected(task_id="b", at=1.0, reason="bad", original=b"{}"))
    assert (count(fold, "tasks_submitted"), count(fold, "tasks_cancelled"), count(fold, "tasks_rejected")) == (1, 1, 1)


def test_each_attempt_counts_its_own_outcome() -> None:
    fold = EventFold(Settings())
    fold.observe(ev.Submitted(task_id="a", at=1.0, type="flaky", priority="low", region="eu"))
    fold.observe(ev.Started(task_id="a", at=2.0, attempt=1))
    fold.observe(ev.Retrying(task_id="a", at=3.0, attempt=1, error="x", delay_s=1.0))
    fold.observe(ev.Started(task_id="a", at=5.0, attempt=2))
    fold.observe(ev.Retrying(task_id="a", at=6.0, attempt=2, error="x", delay_s=1.0))
    fold.observe(ev.Started(task_id="a", at=8.0, attempt=3))
    fold.observe(ev.Dead(task_id="a", at=9.0, attempt=3, error="x"))
    assert count(fold, "tasks_retried") == 2 and count(fold, "tasks_dead") == 1
    assert sum(sum(b.counts) for b in fold.durations.values()) == 3  # every attempt's run
    assert sum(sum(b.counts) for b in fold.waits.values()) == 1  # the wait is to the first start only


def test_a_task_the_fold_never_saw_submitted_takes_its_labels_from_the_task_list() -> None:
    known = {"old": ("report", "medium", "us")}
    fold = EventFold(Settings(), lambda task_id: known.get(task_id))
    fold.observe(ev.Succeeded(task_id="old", at=1.0, attempt=1))
    fold.observe(ev.Failed(task_id="lost", at=1.0, attempt=1, region="eu", error="x"))
    assert fold.counts["tasks_completed"] == {("report", "medium", "us"): 1}
    assert fold.counts["tasks_failed"] == {(UNKNOWN, "", "eu"): 1}


def test_types_past_the_cap_are_other_and_the_task_map_is_bounded() -> None:
    fold = EventFold(Settings(metrics_max_types=2, metrics_max_tasks=3))
    for i in range(5):
        fold.observe(ev.Submitted(task_id=f"t{i}", at=1.0, type=f"type{i}", priority="high", region="eu"))
    assert {labels[0] for labels in fold.counts["tasks_submitted"]} == {"type0", "type1", OTHER}
    assert count(fold, "tasks_submitted") == 5  # counts stay exact
    assert list(fold.tasks) == ["t2", "t3", "t4"]  # the oldest left the map first
    labels = TypeLabels(1)
    assert (labels("a"), labels("b"), labels("a")) == ("a", OTHER, "a")


def test_buckets_are_cumulative_as_prometheus_has_them() -> None:
    buckets = Buckets()
    for seconds in (0.0005, 0.02, 0.02, 1000.0):
        buckets.observe(seconds)
    pairs = dict(buckets.buckets())
    assert (pairs["0.001"], pairs["0.025"], pairs["600.0"], pairs["+Inf"]) == (1, 3, 3, 4)
    assert buckets.total == 0.0005 + 0.04 + 1000.0
