"""`up --cluster 3`'s servers: three nats-servers on loopback routed into one JetStream
cluster, every stream and bucket replicated on each, a task run while one node is down."""

from __future__ import annotations

import time

import msgspec
import pytest

from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.registry import Registry
from streamsched.testing import all_roles, running
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer, urls

from .conftest import NODES

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_every_stream_is_replicated_and_a_task_runs_with_a_node_down(cluster: list[NatsServer], examples: Registry):
    settings = Settings(nats_url=urls(cluster), replicas=NODES)
    bus = await Bus.connect(settings.nats_url, name="cluster-test")
    try:
        await streams.wait_until_ready(bus)
        await streams.apply(bus, settings)
        await streams.wait_for_leaders(bus, settings)
        names = [config.name or "" for config in streams.stream_configs(settings)] + [f"KV_{kv.bucket}" for kv in streams.kv_configs(settings)]
        replicas = {name: (await bus.js.stream_info(name)).config.num_replicas for name in names}
        leader = (await bus.js.stream_info("WORK")).cluster.leader  # type: ignore[union-attr]
        down = next(node for node in cluster if node.name == leader)
        down.kill()
        lost_at = time.monotonic()
        # The other two elect new leaders for what the lost node led (seconds), then answer.
        await streams.wait_until_ready(bus)
        await streams.wait_for_leaders(bus, settings)
        recovered_s = time.monotonic() - lost_at
        client = Client(bus, await StateStore.open(bus), settings)
        async with running(await all_roles(settings, bus, examples)):
            task = await client.submit("echo", {"n": 1})
            state = await client.wait(task.id, timeout_s=60.0)
    finally:
        await bus.close()
    print(f"\nevery stream led again {recovered_s:.1f} s after losing node {leader}")
    assert set(replicas.values()) == {NODES}, replicas
    assert state.status is Status.SUCCEEDED and msgspec.json.decode(state.result) == {"n": 1}
