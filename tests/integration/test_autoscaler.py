"""The autoscaler against a real server: its signal is the WORK durables' counts, it adds
processes for a backlog and retires the newest when idle (with SIGTERM when no worker
answers the drain request). The processes here are stand-ins; tests/e2e/test_autoscale.py
runs real workers under `up`."""

from __future__ import annotations

import time

import anyio
import msgspec
import pytest

from streamsched import subjects
from streamsched.autoscaler import Autoscaler, Sample, ScaleRule, region_samples
from streamsched.config import Settings
from streamsched.supervisor import RestartPolicy, Role, Supervisor
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.pull import consumer_loads

pytestmark = pytest.mark.anyio

#: Exits 0 on SIGTERM, as a drained worker does.
STAND_IN = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"]


async def publish_work(bus: Bus, count: int, task_type: str = "echo") -> None:
    for n in range(count):
        await bus.js.publish(subjects.work("default", "high", task_type), b"{}", headers={subjects.H_TASK_ID: f"t{n}"})


async def test_the_signal_is_the_queued_and_held_tasks_of_the_regions_work_durables(settings: Settings, bus: Bus):
    await streams.ensure_work_consumers(bus, settings, "default", ["echo", "sleep"])
    await publish_work(bus, 7)
    await publish_work(bus, 2, "sleep")
    durable = subjects.work_consumer("default", "high", "echo")
    pull = await bus.js.pull_subscribe_bind(durable, stream=subjects.WORK_STREAM)
    held = await pull.fetch(3, timeout=2)
    assert len(held) == 3
    sample = region_samples(await consumer_loads(bus, subjects.WORK_STREAM), ["default"], at=1.0)["default"]
    assert sample == Sample(at=1.0, queued=6, held=3)
    for msg in held:
        await msg.ack_sync()
    sample = region_samples(await consumer_loads(bus, subjects.WORK_STREAM), ["default"], at=2.0)["default"]
    assert sample == Sample(at=2.0, queued=6, held=0)


async def test_a_backlog_adds_processes_and_idle_retires_the_newest_with_sigterm_when_no_worker_answers(settings: Settings, bus: Bus):
    settings = msgspec.structs.replace(settings, autoscale_up_ticks=2, autoscale_idle_s=0.0, autoscale_tick_s=0.1)
    await streams.ensure_work_consumers(bus, settings, "default", ["echo"])
    supervisor = Supervisor([], {"PATH": "/usr/bin:/bin"}, RestartPolicy())
    rule = ScaleRule.of(settings, (1, 3), concurrency=2)
    autoscaler = Autoscaler(supervisor, settings, {"default": rule}, lambda region, n: Role(f"worker {region}#{n}", STAND_IN, stop_stage=0))
    try:
        autoscaler.start()
        assert [p.role.name for p in supervisor.processes] == ["worker default#1"]

        await publish_work(bus, 10)  # 10 queued for 2 slots
        await autoscaler.tick(bus)
        assert len(supervisor.processes) == 1, "one busy sample is not enough"
        await autoscaler.tick(bus)
        assert [p.role.name for p in supervisor.processes] == ["worker default#1", "worker default#2", "worker default#3"]

        await bus.js.purge_stream(subjects.WORK_STREAM)
        await autoscaler.tick(bus)  # idle: the newest goes; nobody answers its drain request
        third = supervisor.processes[2]
        assert third.retirement is not None and third.retirement.termed
        deadline = time.monotonic() + 10
        while len(supervisor.processes) > 2:
            assert time.monotonic() < deadline, "the retired stand-in did not exit"
            assert supervisor.check() is None
            await anyio.sleep(0.02)
        assert [p.role.name for p in supervisor.processes] == ["worker default#1", "worker default#2"]
        await autoscaler.tick(bus)
        await autoscaler.tick(bus)  # at MIN: the last one stays, however idle
        deadline = time.monotonic() + 10
        while len(supervisor.processes) > 1:
            assert time.monotonic() < deadline
            assert supervisor.check() is None
            await anyio.sleep(0.02)
        await autoscaler.tick(bus)
        assert [p.role.name for p in supervisor.processes] == ["worker default#1"]
        assert all(p.retirement is None for p in supervisor.processes)
    finally:
        supervisor.stop(5.0, lambda: False)
