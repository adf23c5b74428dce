"""Running roles as a service: one task group, signals handled in one place.

Every CLI role command ends in :func:`run_service`, which runs :func:`serve` on the
configured event loop. The first SIGINT/SIGTERM asks each role to shut down (they stop
fetching and drain); a second one exits at once.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import anyio
from prometheus_client import CollectorRegistry

from .. import logs, tracing
from ..config import LOG_FORMAT_ENV, Settings
from ..transport.answering import when_answered
from ..transport.bus import Bus
from .health import Health
from .metrics import process_registry, register_roles
from .metrics import serve as serve_metrics

log = logging.getLogger("streamsched.service")


class Role(Protocol):
    """The shape every role has: ``run()`` until done, ``shutdown()`` to ask it to stop."""

    async def run(self) -> None: ...

    async def shutdown(self) -> None: ...


def configure_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """Log to stderr at ``level``, as ``log_format`` says (``text`` or ``json``; default
    ``STREAMSCHED_LOG_FORMAT``, else text): see :mod:`streamsched.logs`."""
    logs.configure(level, log_format or os.environ.get(LOG_FORMAT_ENV) or "text")


def run_service(settings: Settings, name: str, build: Callable[[Bus], Awaitable[Sequence[Role]]]) -> None:
    """:func:`serve` on the event loop ``settings.event_loop`` names (uvloop when installed)."""
    use_uvloop = settings.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is not None
    if settings.event_loop == "uvloop" and not use_uvloop:
        log.info("uvloop is not installed; running on asyncio's own event loop")
    anyio.run(serve, settings, name, build, backend_options={"use_uvloop": use_uvloop})


async def serve(settings: Settings, name: str, build: Callable[[Bus], Awaitable[Sequence[Role]]]) -> None:
    """Connect, build the roles, run them until they finish or a signal stops them.

    With a metrics port, the endpoint (``/metrics``, ``/health``, ``/ready``) is up before
    the connection: a probe finds the process alive and not yet ready while it waits for
    NATS or for JetStream to answer, rather than finding no port and restarting it."""
    tracing.configure(name)  # on only if the OTEL_* variables ask for export
    health = Health()
    registry = process_registry((), settings.metrics_max_types)
    if settings.metrics_port:
        serve_metrics(registry, settings.metrics_port, settings.metrics_host, health)
    async with anyio.create_task_group() as beating:
        if settings.metrics_port:
            beating.start_soon(health.beat)
        await _connect_and_run(settings, name, build, health, registry)
        beating.cancel_scope.cancel()


async def _connect_and_run(
    settings: Settings, name: str, build: Callable[[Bus], Awaitable[Sequence[Role]]], health: Health, registry: CollectorRegistry
) -> None:
    bus = await Bus.connect(settings.nats_url, name=name, wait_for_server=True)
    try:
        # A role started while a cluster elects its leaders (a rolling restart, a node lost) waits rather than crash-loops.
        roles = await when_answered(lambda: build(bus), "while the roles start")
        register_roles(registry, roles, settings.metrics_max_types)
        health.watch(bus, roles)
        # What exists now (modules, settings, the connection, the roles) lives as long as the
        # process: take it out of the cyclic collector's reach, or every full collection walks
        # it again (tens of milliseconds each, several per second under load).
        gc.collect()
        gc.freeze()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, roles)
            async with anyio.create_task_group() as role_group:
                for role in roles:
                    role_group.start_soon(role.run)
            tg.cancel_scope.cancel()
    finally:
        await bus.close()
        tracing.shutdown()  # exports the spans still buffered


async def _stop_on_signal(roles: Sequence[Role]) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: draining (send it again to exit at once)", signal.Signals(signum).name)
            for role in roles:
                await role.shutdown()
            break
        async for _ in signals:
            log.warning("second signal: exiting now")
            os._exit(130)
