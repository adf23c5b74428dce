"""KV ``workers`` and ``regions`` (the live workers and regional schedulers) survive a
restart of the server, and ``streams apply`` makes one again when its storage differs from
the definition (JetStream cannot change a stream's storage in place)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from nats.js.api import StorageType

from streamsched import subjects
from streamsched.config import Settings
from streamsched.testing import nats_server
from streamsched.transport import streams
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

HEARTBEAT_STREAMS = [f"KV_{bucket}" for bucket in sorted(streams.HEARTBEAT_BUCKETS)]


async def test_the_heartbeat_buckets_are_still_there_after_a_restart_of_the_server(tmp_path: Path):
    with nats_server(tmp_path / "js") as server:
        settings = Settings(nats_url=server.url)
        bus = await Bus.connect(server.url, name="test")
        try:
            await streams.apply(bus, settings)
            kv = await bus.js.key_value(subjects.WORKERS_BUCKET)
            await kv.put("worker-1", b"{}")
        finally:
            await bus.close()
        server.stop()
        server.restart()
        bus = await Bus.connect(server.url, name="test")
        try:
            for name in HEARTBEAT_STREAMS:
                assert (await bus.js.stream_info(name)).config.storage == StorageType.FILE
            # Nothing for streams apply to make: a role finds its bucket as it left it.
            changes = {(change.kind, change.name): change.action for change in await streams.apply(bus, settings)}
            assert {changes[("kv", bucket)] for bucket in streams.HEARTBEAT_BUCKETS} == {"unchanged"}
        finally:
            await bus.close()


async def test_apply_makes_a_heartbeat_bucket_again_when_its_storage_differs(bus: Bus, settings: Settings):
    workers = next(kv for kv in streams.kv_configs(settings) if kv.bucket == subjects.WORKERS_BUCKET)
    await bus.js.delete_key_value(subjects.WORKERS_BUCKET)
    await bus.js.create_key_value(dataclasses.replace(workers, storage=StorageType.MEMORY))

    changes = {(change.kind, change.name): change for change in await streams.apply(bus, settings)}

    assert changes[("kv", subjects.WORKERS_BUCKET)].action == "recreated"
    assert changes[("kv", subjects.REGIONS_BUCKET)].action == "unchanged"
    assert (await bus.js.stream_info(f"KV_{subjects.WORKERS_BUCKET}")).config.storage == StorageType.FILE
    again = {(change.kind, change.name): change.action for change in await streams.apply(bus, settings)}
    assert again[("kv", subjects.WORKERS_BUCKET)] == "unchanged"
