"""Fixtures: a real nats-server per test (free loopback port, temporary store), chained
server -> settings -> bus -> streams applied -> event log."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from streamsched.config import Settings
from streamsched.registry import Registry
from streamsched.testing import EventLog, nats_server
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the `workers/` examples run as tests too
    sys.path.insert(0, str(REPO))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # nats-py is asyncio-only


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path / "js") as srv:
        yield srv


@pytest.fixture
def settings(server: NatsServer) -> Settings:
    """Fast retries and a short ack_wait so fault tests finish in seconds."""
    return Settings.load(
        {},
        nats_url=server.url,
        retry_base_s=0.05,
        retry_max_s=0.5,
        ack_wait_s=2.0,
        grace_s=5.0,
    )


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    bus = await Bus.connect(settings.nats_url, name="test")
    await streams.apply(bus, settings)
    yield bus
    await bus.close()


@pytest.fixture
async def events(bus: Bus) -> AsyncIterator[EventLog]:
    log = await EventLog(bus).start()
    yield log
    await log.stop()


@pytest.fixture
def examples() -> Registry:
    return Registry.from_modules(["workers.examples"])


@pytest.fixture
def registry(examples: Registry, request: pytest.FixtureRequest) -> Registry:
    """The example handlers plus the ones the requesting test module defines."""
    examples.add_module(request.module)
    return examples


def subprocess_env(settings: Settings) -> dict[str, str]:
    """Environment for role subprocesses started by e2e tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCHED_")}
    env.update(
        NATS_URL=settings.nats_url,
        STREAMSCHED_RETRY_BASE_S=str(settings.retry_base_s),
        STREAMSCHED_RETRY_MAX_S=str(settings.retry_max_s),
        STREAMSCHED_ACK_WAIT_S=str(settings.ack_wait_s),
        STREAMSCHED_GRACE_S=str(settings.grace_s),
        STREAMSCHED_PROJECTOR_PARTITIONS=str(settings.projector_partitions),
        PYTHONPATH=str(REPO),
    )
    return env
