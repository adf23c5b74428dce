"""The autoscaler's rule (`up --autoscale MIN:MAX`): busy samples in a row add workers, a
long idle window drains one, and a load near a threshold does not make the count flap."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamsched.autoscaler import Sample, ScaleRule, desired_workers, parse_bounds, region_samples
from streamsched.config import Settings
from streamsched.errors import ConfigError
from streamsched.subjects import work, work_consumer
from streamsched.transport.pull import ConsumerLoad

#: 1 to 5 workers of 10 slots; 2 busy ticks; 10 s idle; ticks 1 s apart in the simulations.
RULE = ScaleRule(min_workers=1, max_workers=5, concurrency=10, busy_load=1.0, idle_load=0.5, up_ticks=2, up_step=2, idle_s=10.0)
TICK_S = 1.0


def simulate(loads: Iterable[tuple[int, int]], start: int = 1, rule: ScaleRule = RULE) -> list[int]:
    """Feed (queued, held) one tick apart as the autoscaler does (the samples start again at
    each change); the worker count after each tick."""
    samples: list[Sample] = []
    count = start
    counts = []
    for tick, (queued, held) in enumerate(loads):
        samples.append(Sample(at=tick * TICK_S, queued=queued, held=held))
        desired = desired_workers(samples, count, rule)
        if desired != count:
            samples = []
            count = desired
        counts.append(count)
    return counts


def test_a_backlog_sustained_for_up_ticks_adds_workers_as_the_load_needs_at_most_up_step_at_once():
    # 1 worker of 10 slots holds 20 (10 running, 10 prefetched) with 100 more queued.
    assert simulate([(100, 20)] * 2) == [1, 3]
    # Just over the slots: one more worker is enough.
    assert simulate([(2, 10)] * 2) == [1, 2]
    # Kept up, it goes on up to MAX and no further, each step after its own busy ticks.
    assert simulate([(1000, 20)] * 9) == [1, 3, 3, 5, 5, 5, 5, 5, 5]


def test_a_backlog_for_fewer_than_up_ticks_samples_adds_nothing():
    assert simulate([(100, 20), (0, 5), (100, 20), (0, 5), (100, 20)]) == [1] * 5


def test_a_load_hovering_at_the_busy_threshold_never_changes_the_count():
    at_capacity = (0, 20)  # 2 workers x 10 slots, all held: busy needs more than that
    just_over, just_under = (1, 20), (0, 19)
    assert simulate([at_capacity] * 50, start=2) == [2] * 50
    assert simulate([just_over, just_under] * 25, start=2) == [2] * 50
    assert simulate([just_under, at_capacity, just_over] * 20, start=2) == [2] * 60


def test_idle_for_idle_s_drains_one_worker_at_a_time_down_to_min():
    counts = simulate([(0, 0)] * 40, start=3)
    # 10 s of idle samples (ticks 0..10) drain one; the next needs its own 10 s.
    assert counts[:10] == [3] * 10 and counts[10] == 2
    assert counts[11:21] == [2] * 10 and counts[21] == 1
    assert counts[22:] == [1] * 18


def test_tasks_held_above_the_idle_share_of_one_worker_fewer_keep_the_workers():
    # 3 workers: one fewer has 20 slots, half of them is 10.
    assert simulate([(0, 11)] * 30, start=3) == [3] * 30
    assert simulate([(0, 10)] * 11, start=3)[-1] == 2
    # One queued task is not idle, held tasks or not.
    assert simulate([(1, 0)] * 30, start=3) == [3] * 30


def test_one_busy_sample_in_the_window_starts_the_idle_wait_again():
    loads = [(0, 0)] * 8 + [(0, 15)] + [(0, 0)] * 12
    counts = simulate(loads, start=2)
    assert counts.index(1) == 8 + 1 + 10, counts


def test_a_count_outside_min_max_is_brought_inside():
    assert desired_workers([], 0, RULE) == 1
    assert desired_workers([], 7, RULE) == 5
    fixed = dataclasses.replace(RULE, min_workers=3, max_workers=3)
    assert simulate([(1000, 60)] * 5 + [(0, 0)] * 30, start=3, rule=fixed) == [3] * 35


def test_idle_s_zero_drains_on_one_idle_sample_and_up_ticks_one_scales_on_one_busy_sample():
    eager = dataclasses.replace(RULE, idle_s=0.0, up_ticks=1)
    assert simulate([(0, 0)] * 3, start=4, rule=eager) == [3, 2, 1]
    assert simulate([(5, 10)], rule=eager) == [2]


@given(
    queued=st.integers(min_value=0, max_value=200),
    held=st.integers(min_value=0, max_value=100),
    start=st.integers(min_value=1, max_value=5),
    idle_load=st.floats(min_value=0.0, max_value=0.95),
)
def test_under_a_steady_load_the_count_moves_one_way_only(queued: int, held: int, start: int, idle_load: float):
    rule = dataclasses.replace(RULE, idle_load=idle_load)
    counts = [start, *simulate([(queued, held)] * 60, start=start, rule=rule)]
    steps = [b - a for a, b in itertools.pairwise(counts) if b != a]
    assert all(step > 0 for step in steps) or all(step < 0 for step in steps), counts


@pytest.mark.parametrize(("text", "bounds"), [("1:3", (1, 3)), ("2:2", (2, 2)), (" 1 : 10 ", (1, 10))])
def test_min_max_bounds_parse(text: str, bounds: tuple[int, int]):
    assert parse_bounds(text) == bounds


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("3:1", "MIN (3) must not exceed MAX (1)"),
        ("0:3", "MIN must be at least 1, not 0"),
        ("3", "expected MIN:MAX"),
        ("1:3:5", "expected MIN:MAX"),
        ("-1:2", "expected MIN:MAX"),
        ("a:b", "expected MIN:MAX"),
        (":", "expected MIN:MAX"),
    ],
)
def test_bad_min_max_bounds_say_what_is_wrong(text: str, says: str):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_bounds(text)


def test_settings_refuse_an_idle_share_not_below_the_busy_one():
    with pytest.raises(ConfigError, match="autoscale_idle_load must be at least 0 and below autoscale_busy_load"):
        Settings.load({}, autoscale_idle_load=1.0, autoscale_busy_load=1.0)
    with pytest.raises(ConfigError, match="autoscale_tick_s"):
        Settings.load({"STREAMSCHED_AUTOSCALE_TICK_S": "0"})
    assert Settings.load({"STREAMSCHED_AUTOSCALE_IDLE_S": "3"}).autoscale_idle_s == 3.0


def test_a_region_sample_sums_its_work_durables_and_leaves_other_consumers_out():
    def listed(name: str, filter_subject: str, pending: int, held: int) -> dict[str, object]:
        """A consumer as ``$JS.API.CONSUMER.LIST`` describes it (the fields read here)."""
        return {"name": name, "num_pending": pending, "num_ack_pending": held, "config": {"filter_subject": filter_subject}}

    def durable(region: str, priority: str, task_type: str, pending: int, held: int) -> dict[str, object]:
        return listed(work_consumer(region, priority, task_type), work(region, priority, task_type), pending, held)

    loads = msgspec.convert(
        [
            durable("eu", "high", "echo", 3, 1),
            durable("eu", "low", "emails.send", 4, 2),
            durable("us", "high", "echo", 100, 100),  # a region up does not run
            listed("someone-else", "work.eu.high.echo", 50, 50),  # not a worker durable
            listed("master", "tasks.submit", 50, 50),
        ],
        list[ConsumerLoad],
    )
    samples = region_samples(loads, ["eu", "ap"], at=7.0)
    assert samples == {"eu": Sample(at=7.0, queued=7, held=3), "ap": Sample(at=7.0, queued=0, held=0)}
