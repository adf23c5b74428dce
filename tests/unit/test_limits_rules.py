"""The rules of concurrency keys, rate limits and fair shares: the header a task carries, the
gates and lane it gets, the settings' checks, and how its ``held`` and ``dispatched`` fold."""

from __future__ import annotations

import pytest

from streamsched import subjects
from streamsched.cli_limits import table
from streamsched.config import Settings
from streamsched.errors import ConfigError
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import fold
from streamsched.model import Envelope, Status
from streamsched.roles import limits


def test_the_header_names_only_the_limits_a_task_has_and_parses_back():
    assert limits.header_value(Envelope(type="t")) is None
    value = limits.header_value(Envelope(type="t", concurrency_key="a=b", concurrency_limit=3, rate_key="api", fairness_key="tenant-1"))
    assert value == "c=a=b n=3 r=api f=tenant-1"
    assert limits.parse_header(value) == {"c": "a=b", "n": "3", "r": "api", "f": "tenant-1"}


def test_gates_take_the_limit_from_the_task_or_the_settings_and_name_what_they_wait_for():
    settings = Settings.load({}, concurrency_limits={"k": 2}, rate_limits={"email.send": 20, "api": 5}, fairness_weights={"big": 3})
    assert limits.gates(settings, "other", None) is None
    by_settings = limits.gates(settings, "other", "c=k")
    assert by_settings is not None and by_settings.slots is not None and by_settings.slots.limit == 2
    by_task = limits.gates(settings, "other", "c=k n=7")
    assert by_task is not None and by_task.slots == limits.SlotSet(by_settings.slots.prefix, 7, "k")
    by_type = limits.gates(settings, "email.send", None)
    assert by_type is not None and by_type.rate is not None and by_type.rate[1] == 20 and by_type.slots is None
    by_key = limits.gates(settings, "email.send", "r=api")
    assert by_key is not None and by_key.rate is not None and by_key.rate[1] == 5  # the rate key wins over the type
    fair = limits.gates(settings, "other", "f=big")
    assert fair is not None and fair.fair and fair.weight == 3
    both = limits.gates(settings, "email.send", "c=k f=small")
    assert both is not None and both.reason == (
        "waiting for a slot of concurrency key 'k' (at most 2 at once) and rate limit 'email.send' (20/s) and its fair share as 'small' (weight 1)"
    )


def test_a_lane_is_a_subject_token_of_one_region_type_and_limits():
    lane = limits.lane("eu", "billing.charge", "c=tenant/7 f=tenant/7")
    assert subjects.is_token(lane) and lane.startswith("tenant_7-")
    assert lane == limits.lane("eu", "billing.charge", "c=tenant/7 f=tenant/7")
    others = {limits.lane("us", "billing.charge", "c=tenant/7 f=tenant/7"), limits.lane("eu", "billing.refund", "c=tenant/7 f=tenant/7")}
    assert lane not in others and len(others) == 2
    assert limits.lane("eu", "t", None) != limits.lane("eu", "t", "r=api")


def test_settings_read_the_limits_from_the_environment_and_refuse_bad_ones():
    settings = Settings.load({"STREAMSCHED_RATE_LIMITS": "email.send=20, api=0.5", "STREAMSCHED_CONCURRENCY_LIMITS": "tenant-7=3"})
    assert settings.rate_limits == {"email.send": 20.0, "api": 0.5} and settings.concurrency_limits == {"tenant-7": 3}
    with pytest.raises(ConfigError, match="rate_limits: the value of 'api' must be above 0"):
        Settings.load({"STREAMSCHED_RATE_LIMITS": "api=0"})
    with pytest.raises(ConfigError, match="concurrency_limits: a limit may be 1000 at most"):
        Settings.load({}, concurrency_limits={"k": 1001})
    with pytest.raises(ConfigError, match="not a valid key"):
        Settings.load({}, fairness_weights={"has space": 1})


@pytest.mark.parametrize("arrival", ["in order", "dispatched first"])
def test_a_parked_task_is_waiting_with_its_reason_until_dispatched_in_either_order_of_arrival(arrival: str):
    scheduled = ev.Scheduled(task_id="t", at=1.0, region="eu", priority="low")
    held = ev.Held(task_id="t", at=2.0, region="eu", priority="low", reason="waiting for a slot")
    dispatched = ev.Dispatched(task_id="t", at=3.0, region="eu", priority="low")
    parked = fold(fold(None, scheduled), held)
    assert parked.status is Status.WAITING and parked.waiting_reason == "waiting for a slot"
    state = fold(None, scheduled)
    for event in (held, dispatched) if arrival == "in order" else (dispatched, held):
        fold(state, event)
    assert state.status is Status.SCHEDULED and state.waiting_reason is None
    fold(state, ev.Started(task_id="t", at=4.0, attempt=1, region="eu", worker="w"))
    assert state.status is Status.RUNNING


def test_limits_list_shows_the_lanes_then_the_keys_in_use():
    lane = limits.Lane(subject="held.low.k-1", priority="low", region="eu", type="report", parked=12, waiting_for="a slot of concurrency key 'k'")
    rendered = table([lane], [limits.KeyInUse(key="k", held=3, tasks=["a", "b", "c"])])
    assert rendered.splitlines() == [
        "REGION  TYPE    PRIORITY  PARKED  WAITING FOR",
        "eu      report  low       12      a slot of concurrency key 'k'",
        "",
        "CONCURRENCY KEY  SLOTS HELD",
        "k                3",
    ]
