"""``streamsched up``: the whole system on one machine, for a laptop or a demo.

Starts an embedded nats-server (unless given ``--nats-url``), applies the streams, then
launches one plain subprocess per role (``streamsched master``, ``regional``,
``projector``, ``worker``) so both cores work, or several of each (``--masters``,
``--projectors``, ``--regionals`` per region, ``--workers`` per region: replicas share
their role's durable consumers, see docs/ARCHITECTURE.md), and keeps them running: a role that exits
is restarted with backoff, and one that crash-loops stops everything (see
:mod:`streamsched.supervisor`). With ``--autoscale MIN:MAX`` the workers of each region
follow the WORK backlog instead of a fixed count (see :mod:`streamsched.autoscaler`).
Stopping goes in order: workers drain first, then the schedulers, the projector, and
nats-server last. Production runs each role on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec

from .autoscaler import Autoscaler, ScaleRule
from .config import DEFAULT_CONCURRENCY, Settings
from .supervisor import RestartPolicy, Role, RoleProcess, Supervisor, stop_processes
from .transport import streams
from .transport.bus import Bus
from .transport.server import NatsServer, PortInUse, default_config, free_port, local_cluster, port_in_use, urls

log = logging.getLogger("streamsched.up")

#: The embedded server's monitoring port unless told otherwise.
DEFAULT_MONITOR_PORT = 8222
#: Port of the REST API ``up`` runs (``--api-port``).
DEFAULT_API_PORT = 8080
#: Role processes get SIGTERM, then this long beyond ``grace_s`` before SIGKILL.
STOP_MARGIN_S = 10.0
#: How often the supervisor looks at its processes: a signal or an exit is seen within this.
POLL_S = 0.2


@dataclass(frozen=True)
class UpOptions:
    """What ``streamsched up`` was asked for."""

    port: int = 4222
    """Client port of the embedded nats-server; no fallback when taken, since clients are told this address."""
    data_dir: Path = Path(".streamsched")
    workers: int = 1
    """Worker processes per region, unless ``autoscale``."""
    autoscale: tuple[int, int] | None = None
    """(MIN, MAX) worker processes per region, as many as the WORK backlog needs."""
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
    api_port: int = DEFAULT_API_PORT
    """Port of the REST API; 0 runs none."""
    api_host: str = "127.0.0.1"
    """Address of the REST API (the CLI refuses one other than loopback without a token)."""
    cluster: int = 1
    """Embedded nats-servers: more than one form a JetStream cluster on loopback (client
    ports ``port`` onwards) and every stream and bucket is replicated on each."""
    metrics_port_base: int = 0
    """First port of the role processes' own ``/metrics`` (see :func:`metrics_port`); 0: none."""
    masters: int = 1
    """Master processes: they share the ingress durables on TASKS (and the masters' others)."""
    projectors: int = 1
    """Projector processes, one per projector partition (``projector_partitions`` is set to
    this for every role): each folds the events of its share of the tasks."""
    regionals: int = 1
    """Regional scheduler processes per region: they share the region's durables on SCHED."""


ME = [sys.executable, "-m", "streamsched"]


def roles(settings: Settings, options: UpOptions) -> list[Role]:
    """One role process each (or ``options``' replicas of each); workers stop first, then the
    schedulers, then the projectors. Autoscaled workers are not among them: the autoscaler starts them."""
    found = [
        Role(replica_name("master", n, options.masters), [*ME, "master", *_metrics(settings, options, "master", n=n)], stop_stage=1)
        for n in range(1, options.masters + 1)
    ]
    found += [
        Role(
            replica_name("projector", n, options.projectors),
            [*ME, "projector", *_partition(n, options), *_metrics(settings, options, "projector", n=n)],
            stop_stage=2,
        )
        for n in range(1, options.projectors + 1)
    ]
    if options.api_port:
        found.append(Role("api", [*ME, "api", "--host", options.api_host, "--port", str(options.api_port)], stop_stage=1))
    for region in settings.regions:
        for n in range(1, options.regionals + 1):
            regional = [*ME, "regional", "--region", region, *_metrics(settings, options, "regional", region, n)]
            found.append(Role(replica_name(f"regional {region}", n, options.regionals), regional, stop_stage=1))
        if options.autoscale is None:
            found.extend(worker_role(settings, options, region, n) for n in range(1, options.workers + 1))
    return found


def _partition(n: int, options: UpOptions) -> list[str]:
    """The ``--partition`` of projector ``n`` (from 1): partition ``n - 1``, none with one projector."""
    return [] if options.projectors == 1 else ["--partition", str(n - 1)]


def replica_name(role: str, n: int, count: int) -> str:
    """How the supervisor's log lines name the ``n``-th of ``count`` replicas of ``role``
    (``master#2``); a role run once keeps its plain name (``master``)."""
    return role if count == 1 else f"{role}#{n}"


def worker_role(settings: Settings, options: UpOptions, region: str, n: int) -> Role:
    """The ``n``-th worker process of ``region``."""
    command = [*ME, "worker", options.handlers, "--region", region, "--concurrency", str(options.concurrency)]
    return Role(f"worker {region}#{n}", [*command, *_metrics(settings, options, "worker", region, n)], stop_stage=0)


#: A role process's place in the ``/metrics`` port layout: role, region ("" for a role of
#: every region), and its number among the replicas of that role (of that region), from 1.
MetricsSlot = tuple[str, str, int]


def metrics_layout(settings: Settings, options: UpOptions) -> list[MetricsSlot]:
    """Every role process ``up`` may run, in the order of their ``/metrics`` ports: the
    masters, the projectors, the regional schedulers region by region (in the order of
    ``regions``), then the workers region by region, as many slots each as it may run
    workers at once (``--workers``, or the MAX of ``--autoscale``)."""
    per_region = workers_per_region(options)
    return [
        *(("master", "", n) for n in range(1, options.masters + 1)),
        *(("projector", "", n) for n in range(1, options.projectors + 1)),
        *(("regional", region, n) for region in settings.regions for n in range(1, options.regionals + 1)),
        *(("worker", region, n) for region in settings.regions for n in range(1, per_region + 1)),
    ]


def metrics_port(settings: Settings, options: UpOptions, role: str, region: str = "", n: int = 1) -> int | None:
    """The port of a role process's own ``/metrics`` under ``up --metrics-port-base BASE``
    (None without): ``BASE`` plus the process's place in :func:`metrics_layout`, so ports
    run consecutively from ``BASE``: masters, projectors, regional schedulers, workers
    (with one of each and one region: master ``BASE``, projector ``BASE+1``, regional
    scheduler ``BASE+2``, worker ``BASE+3``). An autoscaled worker ``n`` takes the slot
    ``(n-1) % W + 1`` of its region (W slots: at most W run at once), and a restarted role
    keeps its port. The REST API's ``/metrics`` (the cluster's) stays on the API's port."""
    base = options.metrics_port_base
    if not base:
        return None
    if role == "worker":
        n = (n - 1) % workers_per_region(options) + 1
    return base + metrics_layout(settings, options).index((role, region if role in ("regional", "worker") else "", n))


def workers_per_region(options: UpOptions) -> int:
    """The most worker processes ``up`` runs in a region at once."""
    return options.autoscale[1] if options.autoscale is not None else options.workers


def last_metrics_port(settings: Settings, options: UpOptions) -> int:
    """The highest port :func:`metrics_port` gives."""
    return options.metrics_port_base + len(metrics_layout(settings, options)) - 1


def _metrics(settings: Settings, options: UpOptions, role: str, region: str = "", n: int = 1) -> list[str]:
    port = metrics_port(settings, options, role, region, n)
    return [] if port is None else ["--metrics-port", str(port)]


def run(settings: Settings, options: UpOptions) -> bool:
    """Start everything, keep it running until a signal, stop everything in order.

    Returns False when a role crash-looped. Raises
    :class:`~streamsched.transport.server.PortInUse` when a port is taken and
    :class:`~streamsched.transport.server.ServerStartError` when the embedded server does
    not start for another reason, before any role has started.
    """
    if options.api_port and port_in_use(options.api_port, options.api_host):
        raise PortInUse(options.api_port, "api")
    servers = _embedded_servers(options) if options.nats_url is None else []
    url = urls(servers) if servers else str(options.nats_url)
    replicas = options.cluster if len(servers) > 1 else settings.replicas
    settings = msgspec.structs.replace(settings, nats_url=url, replicas=replicas, projector_partitions=options.projectors)
    env = dict(
        os.environ,
        NATS_URL=url,
        STREAMSCHED_REGIONS=",".join(settings.regions),
        STREAMSCHED_REPLICAS=str(settings.replicas),
        STREAMSCHED_PROJECTOR_PARTITIONS=str(settings.projector_partitions),
    )
    supervisor = Supervisor(roles(settings, options), env, options.restarts)
    autoscaler = None
    if options.autoscale is not None:
        rule = ScaleRule.of(settings, options.autoscale, options.concurrency)
        rules = dict.fromkeys(settings.regions, rule)
        autoscaler = Autoscaler(supervisor, settings, rules, lambda region, n: worker_role(settings, options, region, n))
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
        for server in servers:
            server.start()
        for change in anyio.run(_apply, settings):
            log.info("%s", change)
        if not stopping:
            supervisor.start()
            if autoscaler is not None:
                autoscaler.start()
            _banner(url, settings, options, servers)
        looping = anyio.run(_keep_running, supervisor, autoscaler, lambda: stopping)
        if looping is not None:
            _report_crash_loop(looping)
    finally:
        stopping = True
        supervisor.stop(settings.grace_s + STOP_MARGIN_S, lambda: hurry)
        if started := [server.process for server in servers if server.process is not None]:
            log.info("stopping nats-server" if len(started) == 1 else "stopping the nats-servers")
            stop_processes(started, STOP_MARGIN_S, lambda: hurry)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return looping is None


async def _keep_running(supervisor: Supervisor, autoscaler: Autoscaler | None, stopping: Callable[[], bool]) -> RoleProcess | None:
    """Until ``stopping()``: poll the supervisor, the clock by which it notices exits and
    restarts what is due (a signal's handler sets the flag, seen within one poll); the
    autoscaler runs beside it and stops with it. The first crash-looping role, if any."""
    async with anyio.create_task_group() as tg:
        if autoscaler is not None:
            tg.start_soon(autoscaler.run)
        try:
            while not stopping():
                if (looping := supervisor.check()) is not None:
                    return looping
                await anyio.sleep(POLL_S)
        finally:
            tg.cancel_scope.cancel()
    return None


def _embedded_servers(options: UpOptions) -> list[NatsServer]:
    """The embedded nats-server, or the nodes of the embedded cluster, not started yet
    (:meth:`NatsServer.start` checks their ports)."""
    store, config, monitor_port = options.data_dir.resolve() / "jetstream", default_config(), options.monitor_port or None
    if options.cluster == 1:
        servers = [NatsServer(port=options.port, store_dir=store, config=config, monitor_port=monitor_port)]
    else:
        servers = local_cluster(options.cluster, port=options.port, store_dir=store, config=config, monitor_port=monitor_port)
    for server in servers:
        if server.monitor_port is not None and options.monitor_port_fallback and port_in_use(server.monitor_port):
            server.monitor_port = free_port()
    return servers


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
        await streams.wait_until_ready(bus)  # a cluster answers once its nodes have elected a leader
        changes = await streams.apply(bus, settings)
        await streams.wait_for_leaders(bus, settings)
        return changes
    finally:
        await bus.close()


def _banner(url: str, settings: Settings, options: UpOptions, servers: list[NatsServer]) -> None:
    if not servers:
        where = "existing server"
    elif len(servers) == 1:
        where = f"embedded nats-server, data in {servers[0].store_dir}"
    else:
        where = f"{len(servers)} embedded nats-servers in one JetStream cluster, every stream on each; data in {servers[0].store_dir.parent}"
    monitor = ""
    if ports := [server.monitor_port for server in servers if server.monitor_port is not None]:
        fell_back = f"   ({options.monitor_port} was taken, so a free port)" if ports[0] != options.monitor_port else ""
        monitor = "\n  monitoring:  " + "  ".join(f"http://127.0.0.1:{port}/jsz" for port in ports) + fell_back
    policy = options.restarts
    print(
        f"""
streamsched is up
  NATS:        {url}   ({where}){monitor}
  regions:     {", ".join(settings.regions)}   workers per region: {_worker_count(options)} x {options.concurrency} slots
  replicas:    {_replicas(options)}
  handlers:    {options.handlers}{_api_line(options)}{_metrics_line(settings, options)}

Submit a task from any NATS client:
  nats pub tasks.submit '{{"type":"echo","payload":{{"hello":"world"}}}}'
or with the CLI:
  streamsched submit echo --payload '{{"hello":"world"}}' --wait

Roles are restarted if they exit (after {policy.delay_s:g}s, doubling up to {policy.max_delay_s:g}s);
one that fails {policy.crash_loop_exits} times within {policy.crash_loop_window_s:g}s stops everything.
A worker drained by `streamsched workers drain` exits cleanly and is replaced.{_autoscale_note(settings, options)}
Ctrl-C stops everything in order: workers first (running tasks get {settings.grace_s:.0f}s
to finish), then the schedulers, the projector, NATS. A second Ctrl-C kills at once.
""",
        flush=True,
    )


def _api_line(options: UpOptions) -> str:
    if not options.api_port:
        return ""
    host = f"[{options.api_host}]" if ":" in options.api_host else options.api_host
    return f"\n  REST API:    http://{host}:{options.api_port}   (dashboard: /, OpenAPI: /openapi.json, docs: /docs)"


def _metrics_line(settings: Settings, options: UpOptions) -> str:
    cluster = f"\n  metrics:     http://127.0.0.1:{options.api_port}/metrics   (the cluster's)" if options.api_port else ""
    if not options.metrics_port_base:
        return cluster
    ports = f"{options.metrics_port_base}-{last_metrics_port(settings, options)}"
    return f"{cluster}\n  roles:       /metrics on 127.0.0.1, ports {ports}   (masters, projectors, regional schedulers, then workers)"


def _replicas(options: UpOptions) -> str:
    return f"masters {options.masters}, projectors {options.projectors}, regional schedulers per region {options.regionals}"


def _worker_count(options: UpOptions) -> str:
    if options.autoscale is None:
        return str(options.workers)
    low, high = options.autoscale
    return f"{low} to {high} (autoscaled)"


def _autoscale_note(settings: Settings, options: UpOptions) -> str:
    if options.autoscale is None:
        return ""
    return (
        f"\nWorkers are added after {settings.autoscale_up_ticks} samples ({settings.autoscale_tick_s:g}s apart) with more tasks "
        f"queued and held than {settings.autoscale_busy_load:g} per slot,\nand drained one at a time after "
        f"{settings.autoscale_idle_s:g}s with none queued (autoscale_* settings)."
    )
