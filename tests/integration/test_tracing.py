"""Traces of tasks through the roles (run in this process), collected by the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamsched import current_task, task, tracing
from streamsched.client import Client, Workflow
from streamsched.eventlog.state import StateStore
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


@task("test.fails_once")
def fails_once(payload: Any) -> str:
    if current_task().attempt == 1:
        raise RuntimeError("first attempt fails")
    return "ok"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def of_task(exporter: InMemorySpanExporter, task_id: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if (span.attributes or {}).get("streamsched.task.id") == task_id]


def one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}"
    return found[0]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


async def test_a_retried_task_has_a_span_per_hop_and_attempt_under_one_trace(settings, bus, events: EventLog, registry, spans):
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, registry)):
        handle = await client.submit("test.fails_once", id="traced-1")
        assert (await client.wait(handle.id, timeout_s=20)).status == "succeeded"

    found = of_task(spans, "traced-1")
    assert sorted(span.name for span in found) == ["master", "regional", "submit", "worker attempt", "worker attempt"]
    assert len({trace_of(span) for span in found}) == 1
    submit, master, regional = one(found, "submit"), one(found, "master"), one(found, "regional")
    attempts = sorted((span for span in found if span.name == "worker attempt"), key=lambda span: (span.attributes or {})["streamsched.attempt"])
    assert submit.parent is None  # the root: nothing was current where it was submitted
    assert master.parent is not None and master.parent.span_id == span_id(submit)
    assert regional.parent is not None and regional.parent.span_id == span_id(master)
    for attempt in attempts:  # each retry is a new delivery of the message the regional scheduler sent
        assert attempt.parent is not None and attempt.parent.span_id == span_id(regional)
    assert [(span.attributes or {})["streamsched.attempt"] for span in attempts] == [1, 2]
    assert [(span.attributes or {})["streamsched.outcome"] for span in attempts] == ["retrying", "succeeded"]
    assert not attempts[0].status.is_ok and attempts[1].status.is_ok

    recorded = [event for event in events.events if event.task_id == "traced-1"]
    assert [event.attempt for event in recorded if type(event).__name__ == "Started"] == [1, 2]
    assert all(tracing.trace_id(event.trace) == trace_of(submit) for event in recorded), [event.trace for event in recorded]
    # Each event names the span of the hop that recorded it: the worker's name their attempt's.
    by_attempt = {(span.attributes or {})["streamsched.attempt"]: span_id(span) for span in attempts}
    for event in recorded:
        if event.worker:
            assert int(event.trace.split("-")[2], 16) == by_attempt[event.attempt]


async def test_a_workflow_is_one_trace_with_a_span_per_task_linked_to_its_dependencies(settings, bus, events: EventLog, examples, spans):
    workflow = Workflow("traced-wf")
    first = workflow.task("echo", 1, id="first")
    workflow.task("echo", 2, id="second", depends_on=[first])
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, examples)):
        state = await (await client.submit_workflow(workflow)).wait(timeout_s=20)
    assert state.status == "succeeded"

    submit = one([span for span in spans.get_finished_spans() if (span.attributes or {}).get("streamsched.workflow.id") == "traced-wf"], "submit")
    first_spans, second_spans = of_task(spans, "traced-wf-first"), of_task(spans, "traced-wf-second")
    for found in (first_spans, second_spans):
        assert sorted(span.name for span in found) == ["master", "regional", "worker attempt"]
        assert {trace_of(span) for span in found} == {trace_of(submit)}
    second_master, first_master = one(second_spans, "master"), one(first_spans, "master")
    assert [link.context.span_id for link in second_master.links] == [span_id(first_master)]
    for task_id in ("traced-wf-first", "traced-wf-second"):
        recorded = [event for event in events.events if event.task_id == task_id]
        assert recorded and all(tracing.trace_id(event.trace) == trace_of(submit) for event in recorded)


async def test_with_tracing_off_no_header_is_added_and_events_carry_no_trace(settings, bus, events: EventLog, registry):
    assert not tracing.ENABLED
    headers: list[bytes] = []

    async def keep(msg: Any) -> None:
        headers.append(repr(msg.headers).encode())

    sub = await bus.nc.subscribe("*.>", cb=keep)  # SCHED and WORK publishes, the submission, the events
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, registry)):
        handle = await client.submit("test.fails_once", id="untraced-1")
        assert (await client.wait(handle.id, timeout_s=20)).status == "succeeded"
    await sub.unsubscribe()

    assert headers and not any(tracing.TRACEPARENT.encode() in header for header in headers)
    recorded = [event for event in events.events if event.task_id == "untraced-1"]
    assert len(recorded) >= 6 and all(event.trace == "" for event in recorded)


async def test_a_splits_chunks_and_a_batchs_tasks_run_in_the_trace_of_their_submit(settings, bus, events: EventLog, examples, spans):
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, examples)):
        await client.submit("echo", id="traced-split", split={"chunks": [1, 2, 3]})
        batch = await client.submit_many([{"type": "echo", "payload": n, "id": f"traced-batch-{n}"} for n in range(2)], atomic=True)
        assert (await client.wait("traced-split", timeout_s=20)).status == "succeeded"
        for handle in batch:
            assert (await client.wait(handle.id, timeout_s=20)).status == "succeeded"

    split_submit = one(of_task(spans, "traced-split"), "submit")
    gather_master = one(of_task(spans, "traced-split"), "master")
    for chunk in ("traced-split-c0", "traced-split-c1", "traced-split-c2"):
        found = of_task(spans, chunk)
        assert sorted(span.name for span in found) == ["master", "regional", "worker attempt"]
        assert {trace_of(span) for span in found} == {trace_of(split_submit)}
        chunk_master = one(found, "master")
        assert chunk_master.parent is not None and chunk_master.parent.span_id == span_id(gather_master)

    batch_submit = one([span for span in spans.get_finished_spans() if "streamsched.batch.id" in (span.attributes or {})], "submit")
    for n in range(2):
        found = of_task(spans, f"traced-batch-{n}")
        assert sorted(span.name for span in found) == ["master", "regional", "worker attempt"]
        assert {trace_of(span) for span in found} == {trace_of(batch_submit)}
        batch_master = one(found, "master")
        assert batch_master.parent is not None and batch_master.parent.span_id == span_id(batch_submit)
        recorded = [event for event in events.events if event.task_id == f"traced-batch-{n}"]
        assert recorded and all(tracing.trace_id(event.trace) == trace_of(batch_submit) for event in recorded)
