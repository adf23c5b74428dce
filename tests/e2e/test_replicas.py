"""Replicas of every role share its work: two masters, two regional schedulers, two
projectors (one per projector partition) and two workers, each its own process, run a few
thousand tasks; every task runs once, and each process's own /metrics shows it took a share
of its role's work."""

from __future__ import annotations

import collections
import contextlib
import time

import anyio
import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamsched import subjects
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import MAX_GET_MANY, StateStore
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.reading import Since, read
from streamsched.transport.server import free_port

from .conftest import Processes

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TASKS = 3000
#: Submitted in chunks, each once the previous one is stored, so that every replica is
#: pulling while the tasks arrive (a burst stored before the second replica asks would
#: show how the server hands out a backlog, not how replicas share a stream of work).
CHUNK = 100
#: Each replica of two must have taken at least this share of its role's work. An even
#: split is 1/2; on a loaded 2-core machine one replica may be descheduled for a while and
#: the other take more, but one doing (nearly) all of it fails.
LEAST_SHARE = 0.2
#: Replicas of each role, and the counter each one's /metrics keeps of its work.
REPLICAS = 2
WORK_COUNTERS = {
    "master": "master_submissions_total",  # accepted and rejected submissions: filtered to accepted below
    "regional": "regional_released_total",
    "projector": "projector_applied_total",
    "worker": "tasks_completed_total",
}
DEADLINE_S = 60.0


def counted(text: str, name: str) -> float:
    """The sum of a counter's samples in a scrape (a master's: its accepted submissions)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels.get("outcome", "accepted") == "accepted"
    )


async def scrape(http: httpx.AsyncClient, port: int) -> str | None:
    """The process's /metrics once it is ready (connected, its roles pulling; /metrics itself
    answers from the start, before the process has connected)."""
    with contextlib.suppress(httpx.TransportError):  # not serving yet
        if (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
            return (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    return None


async def scrape_all(http: httpx.AsyncClient, ports: dict[str, int]) -> dict[str, str]:
    """Each process's /metrics, once every one of them is ready."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        texts = {name: await scrape(http, port) for name, port in ports.items()}
        if all(text is not None for text in texts.values()):
            return {name: text for name, text in texts.items() if text is not None}
        assert time.monotonic() < deadline, f"not ready: {[name for name, text in texts.items() if text is None]}"
        await anyio.sleep(0.1)


async def projected(bus: Bus) -> bool:
    for name in subjects.projector_consumers(REPLICAS):
        info = await bus.js.consumer_info(subjects.EVENTS_STREAM, name)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_replicas_of_every_role_each_take_a_share_and_no_task_runs_twice(settings: Settings, client: Client, bus: Bus, processes: Processes):
    # As `up --projectors 2`: a projector partition per projector, the setting in every role.
    await streams.apply(bus, msgspec.structs.replace(settings, projector_partitions=REPLICAS))
    partitions = {"STREAMSCHED_PROJECTOR_PARTITIONS": str(REPLICAS)}
    ports: dict[str, int] = {}
    for role in WORK_COUNTERS:
        for n in range(1, REPLICAS + 1):
            name = f"{role}#{n}"
            ports[name] = port = free_port()
            where = ["--region", "default"] if role in ("regional", "worker") else []
            handlers = ["workers.examples"] if role == "worker" else []
            slots = ["--concurrency", "32"] if role == "worker" else []
            partition = ["--partition", str(n - 1)] if role == "projector" else []
            args = [*handlers, *where, *slots, *partition, "--metrics-port", str(port)]
            processes.start(name, role, *args, env=partitions, log_level="INFO")
    async with httpx.AsyncClient(timeout=5) as http:
        await scrape_all(http, ports)  # every replica is up before the first task
        began = time.monotonic()
        ids = [f"rep-{i}" for i in range(TASKS)]
        for start in range(0, TASKS, CHUNK):
            await client.submit_many({"type": "noop", "id": task_id} for task_id in ids[start : start + CHUNK])
        deadline = time.monotonic() + DEADLINE_S
        while True:
            texts = await scrape_all(http, ports)
            done = sum(counted(texts[f"worker#{n}"], WORK_COUNTERS["worker"]) for n in range(1, REPLICAS + 1))
            if done >= TASKS and await projected(bus):
                break
            assert time.monotonic() < deadline, f"{done} of {TASKS} tasks done after {DEADLINE_S}s\n{processes.logs()}"
            await anyio.sleep(0.2)
        elapsed = time.monotonic() - began
        texts = await scrape_all(http, ports)
    assert processes.alive() == list(ports), processes.logs()

    # Every task ran once: one `started` and one `succeeded` each in EVENTS, and its state is final.
    started: collections.Counter[str] = collections.Counter()
    succeeded: collections.Counter[str] = collections.Counter()
    event_messages = 0
    misplaced: list[tuple[str, str]] = []  # (subject, task id) of events outside their task's partition
    async for stored in read(bus, subjects.EVENTS_STREAM, subjects.EVENTS_ALL, Since(seq=1)):
        event_messages += 1
        for event in ev.decode_all(stored.data):
            if stored.subject != subjects.events(stored.subject.split(".")[1], subjects.event_partition(event.task_id, REPLICAS)):
                misplaced.append((stored.subject, event.task_id))
            if isinstance(event, ev.Started):
                started[event.task_id] += 1
            elif isinstance(event, ev.Succeeded):
                succeeded[event.task_id] += 1
    assert set(started) == set(succeeded) == set(ids)
    assert misplaced == []
    assert [task_id for task_id, count in (started + succeeded).items() if count != 2] == []
    store = await StateStore.open(bus)
    statuses = collections.Counter[str]()
    for start in range(0, TASKS, MAX_GET_MANY):
        states = await store.get_many(bus, ids[start : start + MAX_GET_MANY])
        statuses.update(state.status.value for state, _revision in states.values())
    assert statuses == {"succeeded": TASKS}

    # Each replica did a share of its role's work, and together exactly the role's work:
    # no submission routed twice, no task released twice, no event message folded twice.
    work = {name: counted(texts[name], WORK_COUNTERS[name.split("#")[0]]) for name in ports}
    shares = {}
    for role in WORK_COUNTERS:
        mine = [work[f"{role}#{n}"] for n in range(1, REPLICAS + 1)]
        shares[role] = [round(count / sum(mine), 2) for count in mine]
        assert min(mine) >= LEAST_SHARE * sum(mine), f"{role} replicas' work {mine}: one did nearly all of it"
    assert sum(work[f"master#{n}"] for n in range(1, REPLICAS + 1)) == TASKS, work
    assert sum(work[f"regional#{n}"] for n in range(1, REPLICAS + 1)) == TASKS, work
    assert sum(work[f"worker#{n}"] for n in range(1, REPLICAS + 1)) == TASKS, work
    assert sum(work[f"projector#{n}"] for n in range(1, REPLICAS + 1)) == event_messages, work
    print(f"\n{TASKS} tasks in {elapsed:.1f}s ({TASKS / elapsed:.0f}/s); shares of each role's work: {shares}")
