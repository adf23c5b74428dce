"""Prometheus metrics over a real nats-server: the API's /metrics counts what the tasks did
(folded from EVENTS), shows the queues and workers read from JetStream, and a role
process serves its own /metrics; every scrape is parsed with prometheus-client's parser."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from streamsched import subjects
from streamsched.client import Client
from streamsched.rest import create_app
from streamsched.roles import metrics as role_metrics
from streamsched.roles.worker import Worker
from streamsched.testing import all_roles, running
from streamsched.transport import streams
from streamsched.transport.server import free_port

from ..unit.test_deploy_files import alerted, queried

pytestmark = pytest.mark.anyio

#: The names the cluster view exports (the issue's list), as the scrape shows them.
CLUSTER_NAMES = {
    "tasks_submitted_total",
    "tasks_completed_total",
    "tasks_failed_total",
    "tasks_retried_total",
    "tasks_dead_total",
    "tasks_rejected_total",
    "tasks_cancelled_total",
    "queue_size",
    "worker_count",
    "task_duration_seconds_count",
    "task_wait_seconds_count",
    "task_hop_seconds_count",
    "breaker_state",
    "projector_lag_messages",
    "projector_lag_seconds",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value for family in text_string_to_metric_families(text) for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


@pytest.fixture
async def api(settings, bus) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings)) as http:
        yield http


async def scrape(http: AsyncTestClient[Any]) -> Samples:
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    return parse(answer.text)


async def scrape_until(http: AsyncTestClient[Any], done: Callable[[Samples], bool], what: str, timeout_s: float = 20.0) -> Samples:
    """Scrape until ``done`` holds (the fold follows EVENTS, a moment behind the roles)."""
    samples: Samples = {}
    with anyio.move_on_after(timeout_s):
        while not done(samples := await scrape(http)):
            await anyio.sleep(0.1)
        return samples
    raise AssertionError(f"no scrape showed {what} within {timeout_s}s")


async def test_the_counters_move_as_tasks_flow_and_the_names_are_all_there(settings, bus, examples, api):
    before = await scrape(api)
    ok_high, ok_low = 12, 8
    # Two workers share the tasks: the counts come from EVENTS, whole whichever ran what.
    roles = [*await all_roles(settings, bus, examples), Worker(settings, bus, examples, region="default", concurrency=4)]
    async with running(roles), await Client.connect(settings.nats_url, settings=settings) as client:
        for i in range(ok_high + ok_low):
            await client.submit("echo", i, priority="high" if i < ok_high else "low")
        await client.submit("fail", None, max_attempts=2)  # one retry, then dead
        await client.submit("fail_permanent", None)
        await bus.js.publish(subjects.SUBMIT, b'{"type": "echo", "priority": "urgent"}')  # rejected by the master
        delayed = await client.submit("echo", None, delay_s=60)
        with anyio.fail_after(15):  # a task is cancelled once the masters know it
            while (state := await client.get(delayed.id)) is None or state.status != "waiting":
                await anyio.sleep(0.05)
        await client.cancel(delayed.id, reason="not needed")

        def all_ended(samples: Samples) -> bool:
            ended = ("tasks_completed_total", "tasks_dead_total", "tasks_failed_total", "tasks_cancelled_total", "tasks_rejected_total")
            return total(samples, "tasks_completed_total") >= ok_high + ok_low and all(total(samples, name) >= 1 for name in ended)

        await scrape_until(api, all_ended, "every task's outcome")
        await client.open_breaker("noop", region="default")
        after = await scrape(api)
    assert {name for name, _ in after} >= CLUSTER_NAMES
    assert queried('job="streamsched-api"') <= {name for name, _ in after}  # every name the dashboard reads there
    assert alerted({"streamsched-api"}) <= {name for name, _ in after}  # and every one the alert rules read
    assert not any(name.startswith("tasks_") for name, _ in before)  # the fold began with the API: nothing before
    # Exact: each outcome counted once, by the labels of the task.
    assert total(after, "tasks_completed_total") == ok_high + ok_low
    assert total(after, "tasks_completed_total", type="echo", priority="high", region="default") == ok_high
    assert total(after, "tasks_completed_total", type="echo", priority="low", region="default") == ok_low
    assert total(after, "tasks_submitted_total") == ok_high + ok_low + 3
    assert total(after, "tasks_retried_total", type="fail") == 1
    assert total(after, "tasks_dead_total", type="fail") == 1
    assert total(after, "tasks_failed_total", type="fail_permanent") == 1
    assert total(after, "tasks_cancelled_total", type="echo") == 1
    assert total(after, "tasks_rejected_total", type="echo", priority="urgent") == 1
    # Every task that ran was timed: its wait, each attempt's run, its hops.
    ran = ok_high + ok_low + 3  # the echoes, fail's two attempts, fail_permanent's one
    assert total(after, "task_duration_seconds_count") == ran
    assert total(after, "task_wait_seconds_count") == ok_high + ok_low + 2
    assert total(after, "task_hop_seconds_count", hop="dispatched_to_started") >= ok_high + ok_low
    assert total(after, "task_hop_seconds_count", hop="started_to_succeeded") == ok_high + ok_low
    assert total(after, "worker_count", region="default") == 2
    assert total(after, "breaker_state", region="default", type="noop", state="open") == 1
    assert total(after, "breaker_state", region="default", type="noop", state="closed") == 0
    assert total(after, "projector_lag_messages") >= 0 and ("projector_lag_seconds", frozenset()) in after
    # How full each stream is, against the limit its setting gives it.
    assert total(after, "streamsched_stream_max_bytes", stream="TASKS") == settings.tasks_max_bytes
    assert total(after, "streamsched_stream_max_bytes", stream="KV_tasks") == settings.state_max_bytes
    assert total(after, "streamsched_stream_bytes", stream="TASKS") > 0 and total(after, "streamsched_stream_bytes", stream="KV_tasks") > 0


async def test_queue_size_shows_the_work_no_worker_takes(settings, bus, examples, api):
    # The durables a worker of echo made, and it gone: its tasks wait on WORK.
    await streams.ensure_work_consumers(bus, settings, "default", ["echo"])
    async with running(await all_roles(settings, bus, None)), await Client.connect(settings.nats_url, settings=settings) as client:
        for i in range(5):
            await client.submit("echo", i, priority="low")

        def queued(samples: Samples) -> bool:
            return total(samples, "queue_size", region="default", priority="low", stage="work") == 5

        samples = await scrape_until(api, queued, "five tasks queued on WORK")
        shown = (await api.get("/api/v1/cluster/queues")).json()["queues"]  # the dashboard's view of the same counts
    assert {"stage": "work", "region": "default", "priority": "low", "type": "echo", "tasks": 5} in shown
    assert total(samples, "queue_size", stage="delivered") == 0
    assert total(samples, "worker_count", region="default") == 0
    assert total(samples, "tasks_submitted_total", type="echo", priority="low") == 5
    assert total(samples, "tasks_completed_total") == 0


async def test_a_role_process_serves_its_own_counts(settings, bus, examples):
    port = free_port()
    roles = await all_roles(settings, bus, examples)
    registry = role_metrics.process_registry(roles, settings.metrics_max_types)
    server = role_metrics.serve(registry, port, "127.0.0.1")
    assert server is not None
    try:
        async with running(roles), await Client.connect(settings.nats_url, settings=settings) as client, httpx.AsyncClient() as http:
            handles = [await client.submit("echo", i) for i in range(7)]
            for handle in handles:
                await client.wait(handle.id, timeout_s=15)
            samples = parse((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
        taken = role_metrics.serve(registry, port, "127.0.0.1")  # the port is taken: no endpoint, no crash
    finally:
        server.shutdown()
        server.server_close()
    assert taken is None
    assert queried('job=~"streamsched-(master|regional|projector|worker)"') <= {name for name, _ in samples}
    assert alerted({"streamsched-master", "streamsched-regional", "streamsched-projector", "streamsched-worker"}) <= {name for name, _ in samples}
    assert total(samples, "tasks_completed_total", type="echo", region="default") == 7
    assert total(samples, "task_duration_seconds_count", type="echo") == 7
    assert total(samples, "master_submissions_total", outcome="accepted") == 7
    assert total(samples, "regional_released_total", region="default") == 7
    assert total(samples, "projector_applied_total") > 0
    assert total(samples, "process_cpu_seconds_total") > 0
