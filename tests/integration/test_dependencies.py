"""Tasks that wait for other tasks: release in order, cascading cancellation, timeouts,
dependency results, and the registration race, against a real nats-server."""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pytest

from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.registry import Registry, TaskDef, current_task
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


def _collect(payload: Any) -> Any:
    """Returns its payload and the results of its dependencies, as its handler saw them."""
    return {"payload": payload, "deps": current_task().dependency_results}


def _registry() -> Registry:
    registry = Registry.from_modules(["workers.examples"])
    registry.add(TaskDef("collect", _collect))
    return registry


async def submit(bus: Any, **task: Any) -> None:
    await bus.js.publish("tasks.submit", msgspec.json.encode(task))


async def wait_outcomes(events: EventLog, task_ids: list[str], timeout_s: float = 30.0) -> dict[str, str]:
    return {t: ev.kind(await events.wait_final(t, timeout_s=timeout_s)) for t in task_ids}


def first_at(events: EventLog, task_id: str, kind: str) -> float:
    return min(e.at for e in events.of_task(task_id) if ev.kind(e) == kind)


def assert_ran_after_dependencies(events: EventLog, graph: dict[str, list[str]]) -> None:
    for task_id, deps in graph.items():
        started = first_at(events, task_id, "started")
        for dep in deps:
            assert first_at(events, dep, "succeeded") <= started, f"{task_id} started before its dependency {dep} succeeded"


async def test_a_chain_submitted_backwards_runs_in_order_and_passes_results(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, _registry())):
        await submit(bus, id="c3", type="collect", payload=3, depends_on=["c2"])
        await submit(bus, id="c2", type="collect", payload=2, depends_on=["c1"])
        await events.wait(lambda log: "waiting" in log.kinds_of("c2"), what="c2 waiting")
        await submit(bus, id="c1", type="echo", payload="one")
        outcomes = await wait_outcomes(events, ["c1", "c2", "c3"])
    assert outcomes == {"c1": "succeeded", "c2": "succeeded", "c3": "succeeded"}
    assert_ran_after_dependencies(events, {"c2": ["c1"], "c3": ["c2"]})
    waiting = next(e for e in events.of_task("c3") if isinstance(e, ev.Waiting))
    assert waiting.on == ["c2"]
    assert set(events.kinds_of("c3")[:3]) == {"submitted", "waiting", "scheduled"}  # recorded by two roles: any order
    result = msgspec.json.decode(next(e for e in events.of_task("c3") if isinstance(e, ev.Succeeded)).result)
    assert result == {"payload": 3, "deps": {"c2": {"payload": 2, "deps": {"c1": "one"}}}}
    state, _ = await (await StateStore.open(bus)).get("c3")  # type: ignore[misc]
    assert state.waiting_on == ["c2"]


async def test_a_diamond_runs_its_join_after_both_branches(settings, bus, events: EventLog):
    graph = {"d": ["b", "c"], "b": ["a"], "c": ["a"], "a": []}
    async with running(await all_roles(settings, bus, _registry())):
        for task_id in ("d", "c", "b", "a"):
            await submit(bus, id=task_id, type="collect", payload=task_id, depends_on=graph[task_id])
        outcomes = await wait_outcomes(events, list(graph))
    assert set(outcomes.values()) == {"succeeded"}
    assert_ran_after_dependencies(events, graph)
    joined = msgspec.json.decode(next(e for e in events.of_task("d") if isinstance(e, ev.Succeeded)).result)
    assert sorted(joined["deps"]) == ["b", "c"]
    assert joined["deps"]["b"]["deps"] == {"a": {"payload": "a", "deps": {}}}


async def test_a_random_dag_submitted_in_random_order_runs_every_task_after_its_dependencies(settings, bus, events: EventLog):
    rng = random.Random(17)
    ids = [f"r{i}" for i in range(200)]
    graph = {task_id: rng.sample(ids[:i], min(i, rng.randint(0, 3))) for i, task_id in enumerate(ids)}
    order = list(ids)
    rng.shuffle(order)
    async with running(await all_roles(settings, bus, _registry(), concurrency=16)):
        for task_id in order:
            await submit(bus, id=task_id, type="noop", depends_on=graph[task_id])
        outcomes = await wait_outcomes(events, ids, timeout_s=60)
    assert set(outcomes.values()) == {"succeeded"}
    assert_ran_after_dependencies(events, graph)


async def test_a_dead_dependency_cancels_its_dependants_and_theirs(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, _registry())):
        await submit(bus, id="child", type="echo", depends_on=["root"])
        await submit(bus, id="grandchild", type="echo", depends_on=["child"])
        await submit(bus, id="tolerant", type="collect", depends_on=["root"], on_dependency_failure="run")
        await submit(bus, id="root", type="fail", max_attempts=1)
        outcomes = await wait_outcomes(events, ["root", "child", "grandchild", "tolerant"])
    assert outcomes == {"root": "dead", "child": "cancelled", "grandchild": "cancelled", "tolerant": "succeeded"}
    assert "started" not in events.kinds_of("child") and "started" not in events.kinds_of("grandchild")
    reasons = {e.task_id: e.reason for e in events.of_kind("cancelled") if isinstance(e, ev.Cancelled)}
    assert reasons == {"child": "dependency root ended dead", "grandchild": "dependency child ended cancelled"}
    tolerant = msgspec.json.decode(next(e for e in events.of_task("tolerant") if isinstance(e, ev.Succeeded)).result)
    assert tolerant["deps"] == {"root": None}


async def test_a_dependency_that_never_comes_times_out(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, _registry())):
        await submit(bus, id="lonely", type="echo", depends_on=["never"], dependency_timeout_s=1.5)
        began = time.time()
        outcome = await wait_outcomes(events, ["lonely"], timeout_s=15)
    assert outcome == {"lonely": "cancelled"}
    cancelled = next(e for e in events.of_task("lonely") if isinstance(e, ev.Cancelled))
    assert cancelled.reason == "dependency never not finished within 1.5 s"
    assert cancelled.at >= began + 1.4


async def test_bad_dependency_fields_are_rejected_with_the_reason(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, None)):
        await submit(bus, id="selfish", type="echo", depends_on=["selfish"])
        await submit(bus, id="dotted", type="echo", depends_on=["a.b"])
        await submit(bus, id="policy", type="echo", depends_on=["x"], on_dependency_failure="ignore")
        await submit(bus, id="forged", type="echo", dependency_results={"x": 1})
        await events.wait_count("rejected", 4)
    reasons = {e.task_id: e.reason for e in events.of_kind("rejected") if isinstance(e, ev.Rejected)}
    assert "cannot depend on itself" in reasons["selfish"]
    assert "'a.b' is not subject-safe" in reasons["dotted"]
    assert "`on_dependency_failure` must be one of cancel, run" in reasons["policy"]
    assert "filled in by the scheduler" in reasons["forged"]


async def test_the_registration_race_never_leaves_a_dependant_waiting(settings, bus, events: EventLog):
    """A dependency finishing while its dependant registers: whichever side comes second
    resolves the edge (rounds bounded in count and time)."""
    rounds = 40
    deadline = time.monotonic() + 60
    rng = random.Random(5)
    async with running(await all_roles(settings, bus, _registry(), concurrency=16)):
        for i in range(rounds):
            if time.monotonic() > deadline:
                break
            # The dependency first, its dependant a moment later: it finishes while the dependant registers.
            await submit(bus, id=f"dep{i}", type="noop")
            if rng.random() < 0.5:
                await events.wait(lambda log, i=i: "started" in log.kinds_of(f"dep{i}"), what=f"dep{i} started")
            await submit(bus, id=f"waiter{i}", type="noop", depends_on=[f"dep{i}"])
        outcomes = await wait_outcomes(events, [f"waiter{j}" for j in range(i + 1)], timeout_s=30)
    assert set(outcomes.values()) == {"succeeded"}, outcomes


async def test_a_restart_of_every_role_loses_no_waiting_task(settings, bus, events: EventLog):
    registry = _registry()
    async with running(await all_roles(settings, bus, registry)):
        await submit(bus, id="after", type="echo", depends_on=["before", "other"])
        await submit(bus, id="other", type="echo")
        await events.wait(lambda log: "waiting" in log.kinds_of("after") and "succeeded" in log.kinds_of("other"), what="after waiting")
    # Every role is gone; only JetStream holds the waiting task.
    async with running(await all_roles(settings, bus, registry)):
        await submit(bus, id="before", type="echo", payload=1)
        outcomes = await wait_outcomes(events, ["after"])
    assert outcomes == {"after": "succeeded"}
    assert_ran_after_dependencies(events, {"after": ["before", "other"]})


async def test_results_too_big_for_the_body_fail_the_dependant_clearly(settings, bus, events: EventLog):
    small = settings.__class__.load({}, nats_url=settings.nats_url, max_payload_bytes=2000)
    async with running(await all_roles(small, bus, _registry())):
        await submit(bus, id="big", type="echo", payload="x" * 1500)
        await submit(bus, id="bigger", type="echo", payload="y" * 1500)
        await submit(bus, id="needs-both", type="echo", depends_on=["big", "bigger"])
        outcomes = await wait_outcomes(events, ["needs-both"])
    assert outcomes == {"needs-both": "failed"}
    failed = next(e for e in events.of_task("needs-both") if isinstance(e, ev.Failed))
    assert "over max_payload_bytes (2000)" in failed.error
