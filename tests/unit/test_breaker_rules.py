"""The circuit breakers' rules (:func:`streamsched.roles.breakers.decide`) and how the masters
turn the workers' cumulative counters into attempts per tick (:class:`OutcomeDiff`)."""

from __future__ import annotations

import pytest

from streamsched.config import ConfigError, Settings
from streamsched.roles.breaker_keeper import OutcomeDiff
from streamsched.roles.breakers import HISTORY, Breaker, Tally, decide
from streamsched.roles.worker_registry import WorkerInfo

RULES = Settings.load({}, breaker_failures_in_row=3, breaker_failure_rate=0.5, breaker_min_tasks=10, breaker_window_s=60, breaker_cooldown_s=30)
CLOSED = Breaker(region="eu", type="mail")


def tally(*ticks: tuple[float, int, int]) -> Tally:
    counted = Tally()
    for at, succeeded, failed in ticks:
        counted.add(at, succeeded, failed, RULES.breaker_window_s)
    return counted


def test_a_closed_breaker_opens_after_the_configured_failures_in_a_row():
    assert decide(CLOSED, tally((1, 0, 2)), 1, RULES) is None
    decision = decide(CLOSED, tally((1, 0, 2), (2, 0, 1)), 2, RULES)
    assert decision is not None and decision.state == "open" and decision.until == 32
    assert "3 failures in a row" in decision.reason


def test_a_success_ends_the_run_of_failures():
    assert decide(CLOSED, tally((1, 0, 2), (2, 1, 0), (3, 0, 2)), 3, RULES) is None


def test_the_failure_rate_opens_only_over_enough_attempts_within_the_window():
    # 4 of 8 failed, never 3 in a row: under breaker_min_tasks.
    few = tally(*[(t, 1, 1) for t in range(4)])
    assert decide(CLOSED, few, 4, RULES) is None
    many = tally(*[(t, 1, 1) for t in range(5)])
    decision = decide(CLOSED, many, 5, RULES)
    assert decision is not None and decision.state == "open" and "5 of 10" in decision.reason
    # The same attempts spread beyond the window do not count together.
    spread = tally(*[(t * 30, 1, 1) for t in range(5)])
    assert decide(CLOSED, spread, 120, RULES) is None


def test_both_rules_are_off_by_default():
    off = Settings.load({})
    assert decide(CLOSED, tally(*[(t, 0, 100) for t in range(10)]), 10, off) is None


def test_an_open_breaker_half_opens_after_its_cool_down_and_never_when_forced_without_end():
    opened = CLOSED.moved_to("open", 0, "x", until=30)
    assert decide(opened, Tally(), 29.9, RULES) is None
    decision = decide(opened, Tally(), 30, RULES)
    assert decision is not None and decision.state == "half-open"
    forever = CLOSED.moved_to("open", 0, "x", forced=True)
    assert decide(forever, Tally(), 1e9, RULES) is None


def test_a_half_open_breaker_closes_on_success_and_reopens_on_failure():
    half = CLOSED.moved_to("half-open", 0, "x")
    assert decide(half, Tally(), 5, RULES) is None
    closed = decide(half, tally((5, 1, 0)), 5, RULES)
    assert closed is not None and closed.state == "closed"
    reopened = decide(half, tally((5, 1, 1)), 5, RULES)
    assert reopened is not None and reopened.state == "open" and reopened.until == 35


def test_a_breaker_keeps_its_last_changes():
    breaker = CLOSED
    for n in range(HISTORY + 5):
        breaker = breaker.moved_to("open" if n % 2 == 0 else "closed", n, f"change {n}")
    assert len(breaker.history) == HISTORY and breaker.history[-1].reason == f"change {HISTORY + 4}"


def test_breaker_settings_are_checked():
    with pytest.raises(ConfigError):
        Settings.load({}, breaker_failure_rate=1.5)
    with pytest.raises(ConfigError):
        Settings.load({}, breaker_probes=0)


def worker(key: str, started_at: float, outcomes: dict[str, dict[str, int]], region: str = "eu") -> WorkerInfo:
    return WorkerInfo(
        id=key,
        host="h",
        pid=1,
        region=region,
        types=tuple(outcomes),
        concurrency=1,
        prefetch=0,
        version="x",
        started_at=started_at,
        heartbeat_at=started_at,
        heartbeat_s=2,
        outcomes=outcomes,
    )


def test_outcome_diff_counts_what_finished_between_steps():
    diff = OutcomeDiff(started_at=100)
    # Started before the master: what it did before is not news.
    assert diff.step([worker("a", 50, {"mail": {"succeeded": 5, "retrying": 2}})]) == {}
    found = diff.step([worker("a", 50, {"mail": {"succeeded": 6, "retrying": 4, "dead": 1}}), worker("b", 120, {"mail": {"failed": 2}})])
    assert found == {("eu", "mail"): (1, 2 + 1 + 2)}
    # Nothing new: nothing counted; cancelled is neither a success nor a failure.
    assert diff.step([worker("a", 50, {"mail": {"succeeded": 6, "retrying": 4, "dead": 1, "cancelled": 3}})]) == {}


def test_outcome_diff_counts_a_restarted_worker_from_zero():
    diff = OutcomeDiff(started_at=0)
    diff.step([worker("a", 10, {"mail": {"failed": 9}})])
    assert diff.step([worker("a", 10, {"mail": {"failed": 2}})]) == {("eu", "mail"): (0, 2)}  # counters went down
    assert diff.step([worker("a", 30, {"mail": {"failed": 3}})]) == {("eu", "mail"): (0, 3)}  # a new start time
