"""Health-aware routing's pure parts: a region's health, the shares and table, the router's
decisions, the fold of `stranded` and `rerouted`, the `regions list` table, the settings."""

from __future__ import annotations

import collections
import random
import zlib
from typing import Any

import msgspec
import pytest

from streamsched import subjects
from streamsched.cli_regions import as_json, table
from streamsched.config import Settings
from streamsched.errors import ConfigError, Rejected
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import fold
from streamsched.model import Envelope, Status
from streamsched.roles.checks import check_fields
from streamsched.roles.region_registry import RegionInfo
from streamsched.roles.routing import TABLE_SLOTS, RegionHealth, Router, region_health, route_table, shares
from streamsched.transport.streams import kv_configs

NOW = 1_700_000_000.0


def report(region: str, scheduler: str = "box-1", **fields: Any) -> RegionInfo:
    base: dict[str, Any] = dict(id=scheduler, region=region, host="box", pid=1, version="t", started_at=NOW - 60, heartbeat_at=NOW, heartbeat_s=2.0)
    return RegionInfo(**{**base, **fields})


def healthy(region: str, *, capacity: int = 10, **fields: Any) -> RegionHealth:
    return RegionHealth(region=region, schedulers=("s",), workers=1, capacity=capacity, **fields)


def router(*regions: str, failover: str = "wait") -> Router:
    return Router(Settings.load({}, regions=regions, region_failover=failover), bus=None)  # type: ignore[arg-type]  # the mirror is not started here


def spread(route: Router, count: int = 2000) -> collections.Counter[str]:
    return collections.Counter(route.pick(f"task-{n}") for n in range(count))


def test_a_region_is_healthy_with_a_live_scheduler_and_a_worker_and_its_headroom_is_what_its_workers_could_still_take():
    assert RegionHealth(region="eu").problem == "no live regional scheduler"
    assert RegionHealth(region="eu", schedulers=("s",)).problem == "no live worker"
    region = healthy("eu", capacity=10, running=4, waiting=2, backlog=7)
    assert region.healthy and region.problem is None
    assert (region.load, region.headroom) == (13, -3)


def test_region_health_takes_each_regions_newest_report_lists_configured_regions_first_and_others_after():
    infos = [
        report("eu", "old", heartbeat_at=NOW - 1, workers=1, capacity=4, backlog=9),
        report("eu", "new", workers=2, capacity=8, running=3, waiting=1, backlog=5, ack_pending=4),
        report("mars", "m", workers=1, capacity=1),
    ]
    eu, us, mars = region_health(["eu", "us"], infos)
    assert (eu.schedulers, eu.workers, eu.capacity, eu.running, eu.waiting, eu.backlog, eu.ack_pending) == (("new", "old"), 2, 8, 3, 1, 5, 4)
    assert eu.reported_at == NOW and eu.configured
    assert (us.region, us.problem, us.reported_at) == ("us", "no live regional scheduler", None)
    assert (mars.region, mars.configured, mars.healthy) == ("mars", False, True)


def test_regions_with_headroom_share_the_ids_by_it_and_full_regions_by_capacity_squared_over_load():
    assert shares([healthy("eu", capacity=50, running=10), healthy("us", capacity=20, backlog=30)]) == {"eu": 40.0}
    assert shares([healthy("eu", capacity=50, running=10), healthy("us", capacity=20, running=10)]) == {"eu": 40.0, "us": 10.0}
    full = shares([healthy("eu", capacity=10, running=10, backlog=10), healthy("us", capacity=10, running=10, backlog=40)])
    assert full == {"eu": 5.0, "us": 2.0}  # 10²/20 and 10²/50: the region that drains sooner gets more


def test_the_table_gives_each_region_its_share_of_the_slots_and_one_region_a_table_of_one():
    table = route_table({"eu": 40.0, "us": 10.0})
    assert len(table) == TABLE_SLOTS and collections.Counter(table) == {"eu": 80, "us": 20}
    thirds = collections.Counter(route_table({"a": 1.0, "b": 1.0, "c": 1.0}))
    assert sorted(thirds.values()) == [33, 33, 34] and sum(thirds.values()) == TABLE_SLOTS
    assert route_table({"eu": 5.0}) == ("eu",)
    assert route_table({"eu": 1000.0, "us": 0.001}) == ("eu",), "a region too small for a slot leaves a table of one"
    assert route_table({"eu": 0.0}) == () and route_table({}) == ()


def test_before_any_scheduler_registers_and_with_no_healthy_region_the_id_hash_picks_as_before():
    route = router("eu", "us", "ap")
    ids = [f"task-{n}" for n in range(200)]
    hashed = [("eu", "us", "ap")[zlib.crc32(task_id.encode()) % 3] for task_id in ids]
    assert [route.pick(task_id) for task_id in ids] == hashed
    assert route.unhealthy == {}, "nothing is known, so nothing is held"

    route.update(region_health(["eu", "us", "ap"], [report("eu"), report("us")]))  # schedulers, no workers
    assert [route.pick(task_id) for task_id in ids] == hashed
    assert route.unhealthy == {"eu": "no live worker", "us": "no live worker", "ap": "no live regional scheduler"}


def test_one_region_gets_every_task_whatever_its_health():
    route = router("default")
    assert set(spread(route, 100)) == {"default"} and not route.moves
    route.update(region_health(["default"], [report("default")]))
    assert set(spread(route, 100)) == {"default"}
    route.update(region_health(["default"], [report("default", workers=1, capacity=4)]))
    assert set(spread(route, 100)) == {"default"} and route.unhealthy == {}


def test_tasks_that_name_no_region_go_to_the_healthy_regions_by_headroom_and_the_same_id_to_the_same_one():
    route = router("eu", "us", "ap")
    route.update(region_health(["eu", "us", "ap"], [report("eu", workers=1, capacity=30), report("us", workers=1, capacity=10), report("ap")]))
    counts = spread(route)
    assert set(counts) == {"eu", "us"} and 0.70 < counts["eu"] / 2000 < 0.80
    assert route.pick("task-7") == route.pick("task-7")
    assert route.healthy == ("eu", "us") and route.unhealthy == {"ap": "no live worker"}


def test_a_task_pinned_to_a_healthy_region_stays_there_without_a_note():
    route = router("eu", "us")
    route.update(region_health(["eu", "us"], [report("eu", workers=1, capacity=1), report("us", workers=1, capacity=1)]))
    assert route.pinned("t", "eu", None, NOW) == ("eu", None)


def test_a_task_pinned_to_an_unhealthy_region_waits_there_or_goes_to_a_healthy_one_as_its_policy_says():
    route = router("eu", "us")
    route.update(region_health(["eu", "us"], [report("eu"), report("us", workers=1, capacity=4)]))
    region, held = route.pinned("t", "eu", None, NOW)  # the setting's policy: wait
    assert region == "eu" and isinstance(held, ev.Stranded)
    assert (held.task_id, held.region, held.reason) == ("t", "eu", "region eu has no live worker; waiting there (region_failover wait)")
    region, rerouted = route.pinned("t", "eu", "any", NOW)
    assert region == "us" and isinstance(rerouted, ev.Rerouted)
    assert (rerouted.region, rerouted.requested, rerouted.reason) == ("us", "eu", "region eu has no live worker; sent to us (region_failover any)")

    anywhere = router("eu", "us", failover="any")
    anywhere.update(region_health(["eu", "us"], [report("us", workers=1, capacity=4)]))
    region, rerouted = anywhere.pinned("t", "eu", None, NOW)
    assert region == "us" and isinstance(rerouted, ev.Rerouted) and "no live regional scheduler" in rerouted.reason
    assert anywhere.pinned("t", "eu", "wait", NOW)[0] == "eu"


def test_a_task_that_may_go_anywhere_waits_where_it_asked_when_no_region_is_healthy():
    route = router("eu", "us", failover="any")
    route.update(region_health(["eu", "us"], [report("eu"), report("us")]))
    region, held = route.pinned("t", "eu", None, NOW)
    assert region == "eu" and isinstance(held, ev.Stranded)
    assert held.reason == "region eu has no live worker and no region is healthy; waiting there (region_failover any)"


def test_stranded_puts_the_reason_in_the_state_until_an_attempt_starts_and_never_moves_the_status():
    submitted = ev.Submitted(task_id="t", at=1.0, type="echo", priority="medium", region="eu")
    scheduled = ev.Scheduled(task_id="t", at=1.0, region="eu", priority="medium")
    held = ev.Stranded(task_id="t", at=1.0, region="eu", reason="region eu has no live worker")
    dispatched = ev.Dispatched(task_id="t", at=2.0, region="eu", priority="medium")
    started = ev.Started(task_id="t", at=3.0, attempt=1, region="eu", worker="w")
    state = fold(fold(fold(fold(None, submitted), scheduled), held), dispatched)
    assert (state.status, state.stranded) == (Status.SCHEDULED, "region eu has no live worker")
    state = fold(state, started)
    assert (state.status, state.stranded) == (Status.RUNNING, None)
    assert fold(state, held).stranded is None, "a copy of the note folded after the start is over already"
    first = fold(None, held)
    assert (first.status, first.stranded) == (Status.PENDING, "region eu has no live worker")
    assert fold(first, submitted).status is Status.PENDING


def test_a_life_with_a_stranded_note_folds_to_the_same_state_in_any_order():
    life = [
        ev.Submitted(task_id="t", at=1.0, type="echo", priority="medium", region="eu"),
        ev.Scheduled(task_id="t", at=1.0, region="eu", priority="medium"),
        ev.Stranded(task_id="t", at=1.0, region="eu", reason="region eu has no live worker"),
        ev.Dispatched(task_id="t", at=2.0, region="eu", priority="medium"),
        ev.Started(task_id="t", at=3.0, attempt=1, region="eu", worker="w"),
        ev.Succeeded(task_id="t", at=4.0, attempt=1, region="eu", worker="w"),
    ]
    expected = None
    for seed in range(30):
        shuffled = life[:]
        random.Random(seed).shuffle(shuffled)
        state = None
        for event in shuffled:
            state = fold(state, event)
        assert state is not None and (state.status, state.stranded) == (Status.SUCCEEDED, None)
        encoded = msgspec.json.encode(state)
        assert expected is None or encoded == expected
        expected = encoded


def test_rerouted_keeps_why_the_task_runs_elsewhere():
    rerouted = ev.Rerouted(task_id="t", at=1.0, region="us", requested="eu", reason="region eu has no live worker; sent to us")
    state = fold(fold(None, ev.Submitted(task_id="t", at=1.0, type="echo", priority="medium", region="us")), rerouted)
    assert (state.status, state.region, state.rerouted) == (Status.PENDING, "us", "region eu has no live worker; sent to us")
    assert msgspec.json.decode(ev.encode(rerouted))["kind"] == "rerouted"


def test_region_failover_is_checked_on_the_task_and_in_the_settings():
    settings = Settings.load({}, regions=("eu", "us"))
    assert settings.region_failover == "wait"
    check_fields(Envelope(type="echo", region="eu", region_failover="any"), settings)
    with pytest.raises(Rejected, match="unknown region_failover 'anywhere' \\(expected one of wait, any\\)"):
        check_fields(Envelope(type="echo", region="eu", region_failover="anywhere"), settings)
    assert Settings.load({"STREAMSCHED_REGION_FAILOVER": "any"}).region_failover == "any"
    with pytest.raises(ConfigError, match="region_failover must be one of wait, any"):
        Settings.load({"STREAMSCHED_REGION_FAILOVER": "never"})


def test_a_schedulers_key_names_its_region_and_the_bucket_lives_three_heartbeats():
    assert subjects.region_key("eu", "build.example.com-4242") == "eu.build_example_com-4242"
    assert report("eu", "build.example.com-4242").key == "eu.build_example_com-4242"
    entry = report("eu", heartbeat_s=0.5)
    assert entry.is_live(NOW + 1.49) and not entry.is_live(NOW + 1.5)
    [regions] = [kv for kv in kv_configs(Settings.load({"STREAMSCHED_WORKER_HEARTBEAT_S": "0.5"})) if kv.bucket == subjects.REGIONS_BUCKET]
    assert regions.ttl == 1.5


def test_the_regions_table_shows_health_load_and_marks_regions_outside_the_settings():
    regions = region_health(
        ["eu", "us"],
        [report("eu", "box-1", workers=2, capacity=8, running=3, waiting=1, backlog=2, ack_pending=4, heartbeat_at=NOW - 0.5), report("mars", "m")],
    )
    header, eu, us, mars, note = table(regions, NOW).splitlines()
    assert header.split() == ["REGION", "HEALTHY", "SCHEDULERS", "WORKERS", "RUNNING", "WAITING", "BACKLOG", "ACK_PENDING", "HEADROOM", "REPORTED"]
    assert eu.split() == ["eu", "yes", "box-1", "2", "3/8", "1", "2", "4", "2", "0.5s", "ago"]
    assert us.split() == ["us", "no:", "no", "live", "regional", "scheduler", "-", "0", "0/0", "0", "0", "0", "0", "-"]
    assert mars.startswith("mars*") and note.startswith("* served by a live regional scheduler, but not in")
    assert eu.index("box-1") == header.index("SCHEDULERS")
    listed = as_json(regions[0])
    assert (listed["region"], listed["healthy"], listed["problem"], listed["headroom"], listed["schedulers"]) == ("eu", True, None, 2, ("box-1",))
