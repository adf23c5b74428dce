"""``streamsched up``: the whole system on one machine, for a laptop or a demo.

Starts an embedded nats-server (unless given ``--nats-url``), applies the streams, then
launches one plain subprocess per role (``streamsched master``, ``regional``,
``projector``, ``worker``) so both cores work, and keeps them running: a role that exits
is restarted with backoff, and one that crash-loops stops everything (see
:mod:`streamsched.supervisor`). Stopping goes in order: workers drain first, then the
schedulers, the projector, and nats-server last. Production runs each role on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec

from .config import DEFAULT_CONCURRENCY, Settings
from .supervisor import RestartPolicy, Role, RoleProcess, Supervisor, stop_processes
from .transport import streams
from .transport.bus import Bus
from .transport.server import NatsServer, default_config, free_port, port_in_use

log = logging.getLogger("streamsched.up")

#: The embedded server's monitoring port unless told otherwise.
DEFAULT_MONITOR_PORT = 8222
#: Role processes get SIGTERM, then this long beyond ``grace_s`` before SIGKILL.
STOP_MARGIN_S = 10.0


@dataclass(frozen=True)
class UpOptions:
    """What ``streamsched up`` was asked for."""

    port: int = 4222
    """Client port of the embedded nats-server; no fallback when taken, since clients are told this address."""
    data_dir: Path = Path(".streamsched")
    workers: int = 1
    concurrency: int = DEFAULT_CONCURRENCY
    handlers: str = "workers.examples"
    nats_url: str | None = None
    """Use this server instead of embedding one."""
    monitor_port: int = DEFAULT_MONITOR_PORT
    """Monitoring port of the embedded server; 0 turns it off."""
    monitor_port_fallback: bool = True
    """When ``monitor_port`` is taken, use a free port instead (it is a convenience, so a
    second ``up`` on the machine should not fail for it); the CLI clears this when
    ``--monitor-port`` is given."""
    restarts: RestartPolicy = field(default_factory=RestartPolicy)


def roles(settings: Settings, options: UpOptions) -> list[Role]:
    """One role process each; workers stop first, then the schedulers, then the projector."""
    me = [sys.executable, "-m", "streamsched"]
    found = [Role("master", [*me, "master"], stop_stage=1), Role("projector", [*me, "projector"], stop_stage=2)]
    for region in settings.regions:
        found.append(Role(f"regional {region}", [*me, "regional", "--region", region], stop_stage=1))
        for n in range(1, options.workers + 1):
            command = [*me, "worker", options.handlers, "--region", region, "--concurrency", str(options.concurrency)]
            found.append(Role(f"worker {region}#{n}", command, stop_stage=0))
    return found


def run(settings: Settings, options: UpOptions) -> bool:
    """Start everything, keep it running until a signal, stop everything in order.

    Returns False when a role crash-looped. Raises
    :class:`~streamsched.transport.server.PortInUse` when a port is taken and
    :class:`~streamsched.transport.server.ServerStartError` when the embedded server does
    not start for another reason, before any role has started.
    """
    server = _embedded_server(options) if options.nats_url is None else None
    url = server.url if server else str(options.nats_url)
    settings = msgspec.structs.replace(settings, nats_url=url)
    env = dict(os.environ, NATS_URL=url, STREAMSCHED_REGIONS=",".join(settings.regions))
    supervisor = Supervisor(roles(settings, options), env, options.restarts)
    stopping = hurry = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping, hurry
        if stopping and not hurry:
            log.warning("%s while stopping: killing everything now", signal.Signals(signum).name)
            hurry = True
        stopping = True

    # SIGHUP too: when the terminal closes, the roles (in process groups of their own) do
    # not hear it, so ``up`` must stop them.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    looping: RoleProcess | None = None
    try:
        if server is not None:
            server.start()
        for change in anyio.run(_apply, settings):
            log.info("%s", change)
        if not stopping:
            supervisor.start()
            _banner(url, settings, options, server)
        # Polling is the supervisor's clock: it notices exits and restarts what is due, and
        # a signal is seen within one tick.
        while not stopping:
            looping = supervisor.check()
            if looping is not None:
                _report_crash_loop(looping)
                stopping = True
            else:
                time.sleep(0.2)
    finally:
        stopping = True
        supervisor.stop(settings.grace_s + STOP_MARGIN_S, lambda: hurry)
        if server is not None and server.process is not None:
            log.info("stopping nats-server")
            stop_processes([server.process], STOP_MARGIN_S, lambda: hurry)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return looping is None


def _embedded_server(options: UpOptions) -> NatsServer:
    """The embedded nats-server, not started yet (:meth:`NatsServer.start` checks its ports)."""
    monitor_port = options.monitor_port or None
    if monitor_port is not None and options.monitor_port_fallback and port_in_use(monitor_port):
        monitor_port = free_port()
    return NatsServer(
        port=options.port,
        store_dir=options.data_dir.resolve() / "jetstream",
        config=default_config(),
        monitor_port=monitor_port,
    )


def _report_crash_loop(looping: RoleProcess) -> None:
    policy = looping.policy
    log.error(
        "%s exited %d times within %.0f s (%s), so restarting it cannot help; stopping everything. "
        "Its own output above says why; to see it alone, run: %s",
        looping.role.name,
        len(looping.exits),
        policy.crash_loop_window_s,
        ", ".join(how for _, how in looping.exits),
        " ".join(["NATS_URL=" + looping.env["NATS_URL"], "streamsched", *looping.role.command[3:]]),
    )


async def _apply(settings: Settings) -> list[streams.Change]:
    bus = await Bus.connect(settings.nats_url, name="streamsched-up")
    try:
        return await streams.apply(bus, settings)
    finally:
        await bus.close()


def _banner(url: str, settings: Settings, options: UpOptions, server: NatsServer | None) -> None:
    where = f"embedded nats-server, data in {server.store_dir}" if server else "existing server"
    monitor = ""
    if server is not None and server.monitor_port is not None:
        fell_back = f"   ({options.monitor_port} was taken, so a free port)" if server.monitor_port != options.monitor_port else ""
        monitor = f"\n  monitoring:  http://127.0.0.1:{server.monitor_port}/jsz{fell_back}"
    policy = options.restarts
    print(
        f"""
streamsched is up
  NATS:        {url}   ({where}){monitor}
  regions:     {", ".join(settings.regions)}   workers per region: {options.workers} x {options.concurrency} slots
  handlers:    {options.handlers}

Submit a task from any NATS client:
  nats pub tasks.submit '{{"type":"echo","payload":{{"hello":"world"}}}}'
or with the CLI:
  streamsched submit echo --payload '{{"hello":"world"}}' --wait

Roles are restarted if they exit (after {policy.delay_s:g}s, doubling up to {policy.max_delay_s:g}s);
one that fails {policy.crash_loop_exits} times within {policy.crash_loop_window_s:g}s stops everything.
A worker drained by `streamsched workers drain` exits cleanly and is replaced.
Ctrl-C stops everything in order: workers first (running tasks get {settings.grace_s:.0f}s
to finish), then the schedulers, the projector, NATS. A second Ctrl-C kills at once.
""",
        flush=True,
    )
