"""What the e2e tests share: role subprocesses stopped by PID, the schedulers in the test's
process, a client, waiting for a process to exit, and a 3-node cluster on loopback."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog.state import StateStore
from streamsched.testing import all_roles, running
from streamsched.transport.bus import Bus
from streamsched.transport.server import ROUTE_PORT_OFFSET, NatsServer, local_cluster, port_in_use

from ..conftest import subprocess_env


class Processes:
    """Role subprocesses of one test, each logging to its own file; stopped by PID at the end."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.env = subprocess_env(settings)
        self.grace_s = settings.grace_s
        self.log_dir = log_dir
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None, log_level: str = "DEBUG") -> subprocess.Popen[bytes]:
        """Start ``streamsched *args``; ``env`` adds to the environment the settings give."""
        with open(self.log_dir / f"{name}.log", "ab") as log_file:  # a restart adds to its log
            process = subprocess.Popen(
                [sys.executable, "-m", "streamsched", *args, "--log-level", log_level],
                env={**self.env, **(env or {})},
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.started[name] = process
        return process

    def worker(self, name: str, *, concurrency: int, prefetch: int | None = None) -> subprocess.Popen[bytes]:
        more = [] if prefetch is None else ["--prefetch", str(prefetch)]
        return self.start(name, "worker", "workers.examples", "--region", "default", "--concurrency", str(concurrency), *more)

    def schedulers(self) -> None:
        """Master, the default region's scheduler and the projector, one process each."""
        self.start("master", "master")
        self.start("regional", "regional", "--region", "default")
        self.start("projector", "projector")

    def alive(self) -> list[str]:
        return [name for name, process in self.started.items() if process.poll() is None]

    def logs(self) -> str:
        """The tail of every role's log, for assertion messages."""
        tails = []
        for name in self.started:
            lines = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            tails.append(f"--- {name} ---\n" + "\n".join(lines[-25:]))
        return "\n".join(tails)

    def stop_all(self) -> None:
        """SIGTERM every process still running, then SIGKILL those that outlive the grace period."""
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5
        for process in self.started.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(settings: Settings, tmp_path: Path) -> Iterator[Processes]:
    started = Processes(settings, tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
async def client(bus: Bus) -> Client:
    return Client(bus, await StateStore.open(bus))


@pytest.fixture
async def schedulers(settings: Settings, bus: Bus) -> AsyncIterator[None]:
    """Master, regional scheduler and projectors in this process (for the worker fault tests)."""
    async with running(await all_roles(settings, bus, None)):
        yield


def worker_id(process: subprocess.Popen[bytes]) -> str:
    """The id a worker process puts in its ``started`` events."""
    return f"{socket.gethostname()}-{process.pid}"


async def wait_exit(process: subprocess.Popen[bytes], *, timeout_s: float) -> int:
    """The process's exit code; fails if it is still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {process.pid} still running after {timeout_s}s")
        await anyio.sleep(0.02)
    return process.returncode


#: Nodes of the :func:`cluster` fixture.
NODES = 3


def free_base_port() -> int:
    """A client port such that it, the two after it and their route ports are all free."""
    for _ in range(50):
        base = random.randrange(20_000, 40_000)
        if not any(port_in_use(base + i + offset) for i in range(NODES) for offset in (0, ROUTE_PORT_OFFSET)):
            return base
    raise RuntimeError("no free ports for a cluster")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """Three nats-servers routed into one JetStream cluster (as ``up --cluster 3`` runs them), stopped by PID."""
    nodes = local_cluster(NODES, port=free_base_port(), store_dir=tmp_path / "cluster")
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
