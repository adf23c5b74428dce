"""What every benchmark scenario shares: its own nats-server, role processes, a bounded
submitter, completion counting, CPU and RSS measurement, and reading events back.

Measurement stays off the hot path: completions are counted from WORK's stream state
(a worker acks a task there only after its outcome is recorded in EVENTS, and the ack
removes it), and latencies are computed afterwards from the ``at`` of the recorded events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamState

from .. import subjects
from ..config import DEFAULT_CONCURRENCY, Settings
from ..eventlog import events as ev
from ..transport import streams
from ..transport.bus import Bus
from ..transport.server import NatsServer, free_port

#: Handler slots per worker unless a scenario or ``--concurrency`` says otherwise: the
#: worker's default, so the scenarios measure the system as ``streamsched up`` runs it.
CONCURRENCY = DEFAULT_CONCURRENCY
#: Hard cap on how long any wait in a scenario may take.
MAX_WAIT_S = 900.0


@dataclass
class Roles:
    """Which role processes a scenario runs: ``workers`` and ``regionals`` in each region."""

    workers: int = 1
    #: Task slots per worker; None: the scenario's own (:data:`CONCURRENCY`, or less, see ``priority``).
    concurrency: int | None = None
    #: Tasks each worker holds waiting for a slot; None: the worker's default (one per slot).
    prefetch: int | None = None
    handlers: str = "workers.examples"
    masters: int = 1
    regionals: int = 1
    projectors: int = 1
    regions: int = 1

    @property
    def region_names(self) -> tuple[str, ...]:
        """``default`` alone, or ``r1`` ... ``rN``."""
        return ("default",) if self.regions == 1 else tuple(f"r{i}" for i in range(1, self.regions + 1))

    def region_of(self, i: int) -> str | None:
        """The region the ``i``-th task of a scenario names: None (any) with one region,
        else the regions in turn, so each gets an even share."""
        return None if self.regions == 1 else self.region_names[i % self.regions]

    def resolved(self, concurrency: int = 0) -> Roles:
        """These roles, with ``concurrency`` (default :data:`CONCURRENCY`) where none was chosen."""
        return dataclasses.replace(self, concurrency=self.concurrency or concurrency or CONCURRENCY)


def server_pid(server: NatsServer) -> int:
    """The PID of a started server."""
    assert server.process is not None, "the server was not started"
    return server.process.pid


@dataclass
class System:
    """A nats-server and role processes, started and stopped by PID."""

    settings: Settings
    server: NatsServer
    bus: Bus
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def role_pids(self) -> dict[str, int]:
        pids = {name: p.pid for name, p in self.processes.items()}
        pids["nats-server"] = server_pid(self.server)
        return pids

    def start_roles(self, roles: Roles, only: Iterable[str] | None = None) -> None:
        """Start the role processes (``only``: a subset of master, regional, projector, worker)."""
        env = dict(
            os.environ,
            NATS_URL=self.settings.nats_url,
            STREAMSCHED_REGIONS=",".join(self.settings.regions),
            STREAMSCHED_PROJECTOR_PARTITIONS=str(self.settings.projector_partitions),
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
        me = [sys.executable, "-m", "streamsched"]
        quiet = ["--log-level", "WARNING"]
        prefetch = [] if roles.prefetch is None else ["--prefetch", str(roles.prefetch)]
        wanted = set(only or ("master", "regional", "projector", "worker"))
        plan: list[tuple[str, list[str]]] = []
        if "master" in wanted:
            plan += [(f"master{i}", [*me, "master", *quiet]) for i in range(roles.masters)]
        if "projector" in wanted:
            partitions = self.settings.projector_partitions
            plan += [(f"projector{i}", [*me, "projector", *_partition(i, partitions), *quiet]) for i in range(roles.projectors)]
        for region in self.settings.regions:
            # One region keeps the names of the processes (in the CPU and RSS tables) short.
            where = "" if len(self.settings.regions) == 1 else f"-{region}-"
            if "regional" in wanted:
                plan += [(f"regional{where}{i}", [*me, "regional", "--region", region, *quiet]) for i in range(roles.regionals)]
            if "worker" in wanted:
                worker = [*me, "worker", roles.handlers, "--region", region, "--concurrency", str(roles.concurrency), *prefetch, *quiet]
                plan += [(f"worker{where}{i}", worker) for i in range(roles.workers)]
        for name, command in plan:
            self.processes[name] = subprocess.Popen(command, env=env)

    def stop_roles(self, names: Iterable[str] | None = None) -> None:
        chosen = [n for n in self.processes if names is None or any(n.startswith(x) for x in names)]
        for name in chosen:
            if self.processes[name].poll() is None:
                self.processes[name].terminate()
        for name in chosen:
            try:
                self.processes[name].wait(15)
            except subprocess.TimeoutExpired:
                self.processes[name].kill()
                self.processes[name].wait()
            del self.processes[name]


def _partition(i: int, partitions: int) -> list[str]:
    """The ``--partition`` of the ``i``-th projector (partitions in turn), none with one partition."""
    return [] if partitions == 1 else ["--partition", str(i % partitions)]


@contextlib.asynccontextmanager
async def system(settings_overrides: dict[str, Any] | None = None, roles: Roles | None = None) -> AsyncIterator[System]:
    """A fresh nats-server (file storage, temporary store) with streams applied, for the
    regions of ``roles`` (``default`` without) and a projector partition per projector."""
    store = Path(tempfile.mkdtemp(prefix="streamsched-bench-"))
    server = NatsServer(port=free_port(), store_dir=store, monitor_port=free_port()).start()
    chosen = roles or Roles()
    defaults = {"regions": chosen.region_names, "projector_partitions": chosen.projectors}
    settings = Settings.load({}, nats_url=server.url, **{**defaults, **(settings_overrides or {})})
    bus = await Bus.connect(server.url, name="bench-driver")
    sys_ = System(settings, server, bus)
    try:
        await streams.apply(bus, settings)
        yield sys_
    finally:
        sys_.stop_roles()
        await bus.close()
        server.stop()
        subprocess.run(["rm", "-rf", str(store)], check=False)


async def server_messages(server: NatsServer) -> tuple[int, int]:
    """Messages into and out of nats-server so far (its ``/varz``), to count them per task."""
    url = f"http://{server.host}:{server.monitor_port}/varz"

    def get() -> tuple[int, int]:
        with urllib.request.urlopen(url, timeout=5) as response:
            varz = json.load(response)
        return varz["in_msgs"], varz["out_msgs"]

    return await asyncio.to_thread(get)


async def finished_count(bus: Bus) -> int:
    """Tasks whose outcome is recorded: WORK's messages published and no longer there (a
    worker acks or terms a task only after its outcome event landed)."""
    state: StreamState = (await bus.js.stream_info(subjects.WORK_STREAM)).state
    return state.last_seq - state.messages


async def projector_caught_up(bus: Bus) -> bool:
    return all(info.num_pending == 0 and info.num_ack_pending == 0 for info in await streams.projector_durables(bus))


async def projected_through(bus: Bus, stream_seq: int) -> bool:
    """The projectors have settled every EVENTS message up to ``stream_seq`` (they may hold
    later ones). A partition's durable whose last message came earlier has settled it all."""
    return all(
        (info.ack_floor is not None and info.ack_floor.stream_seq >= stream_seq) or (info.num_pending == 0 and info.num_ack_pending == 0)
        for info in await streams.projector_durables(bus)
    )


async def wait_until(predicate: Any, *, timeout_s: float, poll_s: float = 0.05) -> float:
    """Poll an async predicate until true; returns the time it became true."""
    deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
    while time.monotonic() < deadline:
        if await predicate():
            return time.monotonic()
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"benchmark wait timed out after {timeout_s}s")


def envelope(task_id: str, task_type: str = "noop", priority: str = "medium", payload: Any = None, region: str | None = None) -> bytes:
    """A submission's bytes; ``region`` only when given (None: the masters pick one)."""
    body = {"id": task_id, "type": task_type, "priority": priority, "payload": payload}
    if region is not None:
        body["region"] = region
    return msgspec.json.encode(body)


async def submit(bus: Bus, bodies: Iterable[bytes], *, window: int = 4000, subject: str = subjects.SUBMIT) -> float:
    """JetStream-publish every body to ``subject`` (plain ``tasks.submit``) with at most ``window`` in flight; returns seconds."""
    began = time.monotonic()
    failed, first = await bus.publish_many(((subject, body, None) for body in bodies), window=window)
    if failed:
        raise RuntimeError(f"{failed} submissions failed, first: {first!r}")
    return time.monotonic() - began


class CpuMeter:
    """CPU seconds used by each process between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.procs["driver"] = psutil.Process(os.getpid())
        self._start: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._start = {name: _cpu(p) for name, p in self.procs.items()}
        return self

    def stop(self) -> dict[str, float]:
        return {name: max(0.0, _cpu(p) - self._start[name]) for name, p in self.procs.items()}


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return 0.0


def rss_mb(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            out[name] = 0.0
    return out


async def read_events(bus: Bus, kind: str, *, expected: int, timeout_s: float = 120.0) -> list[ev.Event]:
    """Every recorded event of ``kind``, read back from EVENTS with an ephemeral consumer
    (a message holds events of many tasks and kinds: they are picked after decoding)."""
    psub = await bus.js.pull_subscribe(
        subjects.EVENTS_ALL,
        durable=None,
        stream=subjects.EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True),
    )
    out: list[ev.Event] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            try:
                msgs = await psub.fetch(2000, timeout=1.0)
            except TimeoutError:
                continue
            out += [event for m in msgs for event in ev.decode_all(m.data) if ev.kind(event) == kind]
    finally:
        await psub.unsubscribe()
    return out


def percentiles(values: list[float], points: Iterable[float] = (50, 95, 99, 100)) -> dict[str, float]:
    """Nearest-rank percentiles (``p100`` is the max), in the unit given."""
    if not values:
        return {f"p{int(p)}": float("nan") for p in points}
    ordered = sorted(values)
    out = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
        out["max" if p == 100 else f"p{int(p)}"] = ordered[index]
    return out
