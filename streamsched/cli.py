"""The ``streamsched`` command: thin wrappers that parse, build Settings and call the library."""

from __future__ import annotations

import asyncio
import enum
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import typer
import yaml

from . import subjects
from .cli_access import access_app
from .cli_breakers import breakers_app
from .cli_events import (
    dlq_app,
    events_app,
    load_or_exit,
    replay_app,
    schema_app,
    task_app,
)
from .cli_files import MAX_BATCH_TASKS, submit_file
from .cli_limits import limits_app
from .cli_regions import regions_app
from .cli_schedules import schedule_app
from .cli_streams import streams_app
from .cli_workers import workers_app
from .client import Client
from .config import DEFAULT_CONCURRENCY, LOG_FORMAT_ENV, MAX_PROJECTOR_PARTITIONS, PARTITIONS_ENV, Settings
from .errors import AlreadyFinished, NotFound, Overloaded, Unavailable
from .model import DEFAULT_PRIORITY, Status, TaskState
from .roles.service import configure_logging, run_service
from .roles.workflows import WorkflowState
from .supervisor import CRASH_LOOP_EXITS, CRASH_LOOP_WINDOW_S, RESTART_DELAY_MAX_S, RESTART_DELAY_S
from .transport.bus import Bus


class Exit(enum.IntEnum):
    """Exit codes, named so scripts and probes can rely on them."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    TASK_FAILED = 4
    TIMEOUT = 5
    ALREADY_FINISHED = 6
    #: A full stream refused what the command sent, for all of ``submit_retry_budget_s``:
    #: nothing of it was stored, and sending it again later is safe.
    OVERLOADED = 7


app = typer.Typer(
    help="streamsched: a distributed task scheduler on NATS JetStream.",
    epilog=(
        "Examples:\n\n"
        "  streamsched up                                  # everything on this machine\n\n"
        "  streamsched submit echo --payload '{\"a\": 1}' --wait\n\n"
        "  streamsched worker workers.examples --region default --concurrency 32\n\n"
        "Every command but `up` connects to $NATS_URL (default nats://127.0.0.1:4222). One whose publish a full "
        "stream refuses for all of $STREAMSCHED_SUBMIT_RETRY_BUDGET_S (default 5 s; tried again with backoff meanwhile) "
        f"prints the limit in one line and exits {Exit.OVERLOADED:d}."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
app.add_typer(streams_app, name="streams")
app.add_typer(events_app, name="events")
app.add_typer(task_app, name="task")
app.add_typer(dlq_app, name="dlq")
app.add_typer(replay_app, name="replay")
app.add_typer(schema_app, name="schema")
app.add_typer(schedule_app, name="schedule")
app.add_typer(workers_app, name="workers")
app.add_typer(regions_app, name="regions")
app.add_typer(breakers_app, name="breakers")
app.add_typer(limits_app, name="limits")
app.add_typer(access_app, name="access")

LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve this process's Prometheus /metrics on this port (on $STREAMSCHED_METRICS_HOST, default 127.0.0.1) "
        "[default: $STREAMSCHED_METRICS_PORT, or 0: none].",
    ),
]


class LogFormatName(enum.StrEnum):
    """The values of ``--log-format`` (those of :data:`streamsched.logs.FORMATS`)."""

    TEXT = "text"
    JSON = "json"


LogFormat = Annotated[
    LogFormatName | None,
    typer.Option(
        "--log-format",
        help="text (readable lines) or json (one object a line, with task_id, type, attempt and trace_id on a task's lines) "
        "[default: STREAMSCHED_LOG_FORMAT, else text].",
    ),
]
#: The settings' defaults, for help texts.
_DEFAULTS = Settings()


def _regions(value: str | None) -> tuple[str, ...] | None:
    return tuple(r.strip() for r in value.split(",") if r.strip()) if value else None


@app.command(
    help=(
        "Start the whole system on this machine: embedded nats-server, streams, master, regional schedulers, "
        "projector, workers.\n\n"
        "--masters and --regionals (per region) run replicas of those roles, each its own process "
        "(master#1, master#2 ...): they share their role's durable consumers, so each takes a share of the work and no "
        "task is handled twice. --projectors N runs N projectors, each folding one projector partition (the tasks "
        "whose id hashes to it).\n\n"
        f"A role process that exits is restarted (after {RESTART_DELAY_S:g} s, doubling up to {RESTART_DELAY_MAX_S:g} s); "
        f"one that fails {CRASH_LOOP_EXITS} times within {CRASH_LOOP_WINDOW_S:g} s stops everything with exit code "
        f"{Exit.ERROR:d} (a clean exit, code 0, as of a worker drained by `workers drain`, is restarted and is no failure). "
        "Ctrl-C or SIGTERM stops everything in order: workers drain first, then the schedulers, "
        f"the projector and nats-server; a second Ctrl-C kills at once. A taken port gives exit code {Exit.USAGE:d}.\n\n"
        "--autoscale MIN:MAX runs MIN to MAX workers per region instead of --workers. Every autoscale_tick_s "
        f"({_DEFAULTS.autoscale_tick_s:g} s) it sums the region's WORK consumers' num_pending (queued tasks) and "
        "num_ack_pending (held by workers) and compares them with the slots (workers x --concurrency): "
        f"autoscale_up_ticks ({_DEFAULTS.autoscale_up_ticks}) samples in a row with more than autoscale_busy_load "
        f"({_DEFAULTS.autoscale_busy_load:g}) tasks per slot add workers, at most autoscale_up_step "
        f"({_DEFAULTS.autoscale_up_step}) at once; autoscale_idle_s ({_DEFAULTS.autoscale_idle_s:g} s) with nothing "
        f"queued and the held tasks within autoscale_idle_load ({_DEFAULTS.autoscale_idle_load:g}) of the slots of one "
        "worker fewer drain one worker (it finishes what it holds and exits; it is not restarted). Set them as "
        "STREAMSCHED_AUTOSCALE_* variables."
    ),
    epilog=(
        "Examples:\n\n  streamsched up\n\n  streamsched up --autoscale 1:4 --concurrency 8\n\n"
        "  STREAMSCHED_AUTOSCALE_IDLE_S=10 streamsched up --autoscale 2:6\n\n  streamsched up --cluster 3   # three nats-servers, streams R3\n\n"
        "  streamsched up --masters 2 --projectors 2 --regionals 2 --workers 2   # replicas of every role"
    ),
)
def up(
    port: Annotated[int, typer.Option(help="Port of the embedded nats-server (taken: an error, since clients are told this address).")] = 4222,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded server keeps its JetStream store.")] = Path(".streamsched"),
    regions: Annotated[str, typer.Option(help="Comma-separated regions.")] = "default",
    workers: Annotated[int | None, typer.Option(help="Worker processes per region [default: 1].")] = None,
    masters: Annotated[int, typer.Option(min=1, help="Master processes; they share the submissions (the durables on TASKS).")] = 1,
    projectors: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_PROJECTOR_PARTITIONS,
            help="Projector processes, one per projector partition (sets STREAMSCHED_PROJECTOR_PARTITIONS for every role) "
            "[default: $STREAMSCHED_PROJECTOR_PARTITIONS or 1].",
        ),
    ] = None,
    regionals: Annotated[int, typer.Option(min=1, help="Regional scheduler processes per region; they share the region's SCHED durables.")] = 1,
    autoscale: Annotated[
        str | None,
        typer.Option(metavar="MIN:MAX", help="Run MIN to MAX worker processes per region, as many as the backlog needs (not with --workers)."),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers each worker process runs at once.")] = DEFAULT_CONCURRENCY,
    handlers: Annotated[str, typer.Option(help="Module with the @task handlers the workers load.")] = "workers.examples",
    nats_url: Annotated[str | None, typer.Option(help="Use this server instead of embedding one.")] = None,
    monitor_port: Annotated[
        int | None,
        typer.Option(
            help="Monitoring port of the embedded server; 0: off. Default 8222, or a free port if 8222 is taken "
            "(the banner says which); a port given here and taken is an error."
        ),
    ] = None,
    api_port: Annotated[int, typer.Option(min=0, max=65535, help="Port of the REST API; 0: none.")] = 8080,
    api_host: Annotated[str, typer.Option(help="Address of the REST API; another than loopback needs STREAMSCHED_API_TOKEN.")] = "127.0.0.1",
    cluster: Annotated[
        int,
        typer.Option(
            min=1,
            max=5,
            help="Embedded nats-servers: 3 form a JetStream cluster on loopback (client ports --port onwards, routes 2000 above) "
            "with every stream replicated on each, to try losing a server.",
        ),
    ] = 1,
    metrics_port_base: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="Give every role process its own Prometheus /metrics on 127.0.0.1, on consecutive ports from this one: the masters "
            "(--masters), the projectors (--projectors), the regional schedulers region by region (--regionals each), then the "
            "workers region by region (as many ports each as it may run workers); with one of each, master BASE, projector BASE+1, "
            "regional BASE+2, worker BASE+3. 0: none. The cluster's /metrics is the REST API's, on --api-port.",
        ),
    ] = 0,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = None,
) -> None:
    """``streamsched up`` (its help is built above from the supervisor's constants)."""
    from .autoscaler import parse_bounds
    from .transport.server import PortInUse, ServerStartError
    from .up import DEFAULT_MONITOR_PORT, UpOptions, last_metrics_port, run

    bounds = None
    if autoscale is not None:
        if workers is not None:
            raise typer.BadParameter("give --workers or --autoscale, not both", param_hint="'--autoscale'")
        try:
            bounds = parse_bounds(autoscale)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--autoscale'") from None
    configure_logging(log_level, log_format)
    if log_format is not None:  # the role processes inherit the environment
        os.environ[LOG_FORMAT_ENV] = log_format
    settings = load_or_exit(regions=_regions(regions))
    if projectors is None:
        projectors = settings.projector_partitions
    elif PARTITIONS_ENV in os.environ and projectors != settings.projector_partitions:
        # Against running roles (--nats-url) the other count would make streams apply replace their projectors' durables.
        raise typer.BadParameter(f"{PARTITIONS_ENV} is {settings.projector_partitions}: give one count, not two", param_hint="'--projectors'")
    if api_port:
        refuse_public_without_token(api_host, settings, "the REST API")
    options = UpOptions(
        port=port,
        data_dir=data_dir,
        workers=1 if workers is None else workers,
        autoscale=bounds,
        concurrency=concurrency,
        handlers=handlers,
        nats_url=nats_url,
        monitor_port=DEFAULT_MONITOR_PORT if monitor_port is None else monitor_port,
        monitor_port_fallback=monitor_port is None,
        api_port=api_port,
        api_host=api_host,
        cluster=cluster,
        metrics_port_base=metrics_port_base,
        masters=masters,
        projectors=projectors,
        regionals=regionals,
    )
    if metrics_port_base and last_metrics_port(settings, options) > 65535:
        raise typer.BadParameter(f"the role processes need ports up to {last_metrics_port(settings, options)}", param_hint="'--metrics-port-base'")
    try:
        ok = run(settings, options)
    except PortInUse as exc:
        flag = {"client": "--port", "monitor": "--monitor-port", "api": "--api-port (0: none)"}[exc.which]
        typer.echo(f"error: port {exc.port} is already in use (another streamsched up or nats-server?); choose another with {flag}", err=True)
        raise typer.Exit(Exit.USAGE) from None
    except ServerStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(Exit.ERROR) from None
    raise typer.Exit(Exit.OK if ok else Exit.ERROR)


#: Addresses the APIs may listen on without a token: only this machine reaches them.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def refuse_public_without_token(host: str, settings: Settings, what: str) -> None:
    """Exit with a usage error when ``host`` is reachable from other machines and no token guards it."""
    if host not in LOOPBACK_HOSTS and not settings.api_token:
        typer.echo(
            f"error: set STREAMSCHED_API_TOKEN to listen on {host}: without a token {what} listens on loopback only (127.0.0.1, ::1 or localhost)",
            err=True,
        )
        raise typer.Exit(Exit.USAGE)


@app.command()
def api(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on; another than loopback needs STREAMSCHED_API_TOKEN.")] = "127.0.0.1",
    log_level: LogLevel = "INFO",
    log_format: LogFormat = None,
) -> None:
    """Run the REST API: tasks, workflows, workers, cluster info; the dashboard at /, OpenAPI at /openapi.json, docs at /docs, /health and /ready.

    The cluster's Prometheus metrics are at /metrics (see the README's Metrics section).
    """
    import uvicorn

    from .rest import create_app

    configure_logging(log_level, log_format)
    settings = load_or_exit()
    refuse_public_without_token(host, settings, "the REST API")
    # Open event feeds do not hold a stop up for long: they end with the process.
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), lifespan="on", server_header=False, timeout_graceful_shutdown=5)


@app.command("grpc")
def grpc_api(
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one, logged).")] = 50051,
    host: Annotated[str, typer.Option(help="Address to listen on; another than loopback needs STREAMSCHED_API_TOKEN.")] = "127.0.0.1",
    log_level: LogLevel = "INFO",
    log_format: LogFormat = None,
) -> None:
    """Run the gRPC API, service streamsched.v1.Scheduler of proto/streamsched/v1/scheduler.proto: submit, get, list, watch, cancel, reprioritize."""
    configure_logging(log_level, log_format)
    settings = load_or_exit()
    refuse_public_without_token(host, settings, "the gRPC API")
    try:
        from .grpc_server import serve
    except ImportError as exc:
        typer.echo(f"error: the gRPC API needs the grpc extra (pip install 'streamsched[grpc]'): {exc}", err=True)
        raise typer.Exit(Exit.ERROR) from None
    try:
        asyncio.run(serve(settings, host, port))
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(Exit.USAGE) from None


@app.command()
def master(log_level: LogLevel = "INFO", log_format: LogFormat = None, metrics_port: MetricsPort = None) -> None:
    """Run a master scheduler (validates tasks.submit and tasks.submit.<priority>, the higher first; routes to regions; takes cancel requests)."""
    from .roles.master import Master

    configure_logging(log_level, log_format)
    settings = load_or_exit(metrics_port=metrics_port)

    async def build(bus: Bus) -> list[Master]:
        return [Master(settings, bus)]

    run_service(settings, "streamsched-master", build)


@app.command()
def regional(
    region: Annotated[str, typer.Option(help="The region this scheduler serves.")] = "default",
    log_level: LogLevel = "INFO",
    log_format: LogFormat = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Run a regional scheduler (releases one region's tasks onto WORK by priority)."""
    from .roles.regional import Regional

    configure_logging(log_level, log_format)
    settings = load_or_exit(metrics_port=metrics_port)
    _check_region(settings, region)

    async def build(bus: Bus) -> list[Regional]:
        return [Regional(settings, bus, region)]

    run_service(settings, f"streamsched-regional-{region}", build)


@app.command()
def worker(
    modules: Annotated[list[str], typer.Argument(help="Modules with @task handlers, e.g. workers.examples.")],
    region: Annotated[str, typer.Option(help="The region whose tasks this worker runs.")] = "default",
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers run at once.")] = DEFAULT_CONCURRENCY,
    prefetch: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Tasks held beyond the running ones, waiting here for a free slot so the next one is at hand when a "
            "handler returns [default: as --concurrency]; 0 leaves them in the stream for any worker (long tasks).",
        ),
    ] = None,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Run a worker: fetch tasks of a region, run their handlers, ack or retry.

    It holds at most concurrency + prefetch tasks before they run, and up to
    worker_finish_window more whose outcome is being recorded and acked.
    """
    from .registry import Registry
    from .roles.worker import Worker

    configure_logging(log_level, log_format)
    settings = load_or_exit(metrics_port=metrics_port)
    _check_region(settings, region)
    registry = Registry.from_modules(modules)
    if not registry.names():
        typer.echo(f"no @task handlers in {', '.join(modules)}: a worker fetches only the types it has handlers for", err=True)
        raise typer.Exit(2)

    async def build(bus: Bus) -> list[Worker]:
        return [Worker(settings, bus, registry, region=region, concurrency=concurrency, prefetch=prefetch)]

    run_service(settings, f"streamsched-worker-{region}", build)


@app.command()
def projector(
    partition: Annotated[
        int | None,
        typer.Option(
            help="The projector partition to fold (0 to STREAMSCHED_PROJECTOR_PARTITIONS - 1), required when there are "
            "several. Each partition holds the events of the tasks whose id hashes to it; two projectors of one "
            "partition share its work by compare-and-set, so a second one is for availability."
        ),
    ] = None,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Run the state projector (folds EVENTS into KV `tasks`, or one partition's events)."""
    from .eventlog.state import StateStore
    from .roles.projector import Projector

    configure_logging(log_level, log_format)
    settings = load_or_exit(metrics_port=metrics_port)
    consumer = _projector_consumer(settings, partition)
    # Lower priority for the whole process: on shared cores the tasks go first (+15-25 %
    # tasks/s in `bench throughput`, and the view completes no later than at nice 0).
    os.nice(settings.projector_nice)

    async def build(bus: Bus) -> list[Projector]:
        return [Projector(settings, bus, await StateStore.open(bus), consumer=consumer)]

    run_service(settings, "streamsched-projector" if partition is None else f"streamsched-projector-{partition}", build)


@app.command()
def submit(
    type: Annotated[str | None, typer.Argument(help="Task type (handler name); not with --workflow or --file.")] = None,
    payload: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    priority: Annotated[
        str,
        typer.Option(help="high, medium or low (the configured ones); sent on tasks.submit.<priority>, which the master reads before lower ones."),
    ] = DEFAULT_PRIORITY,
    id: Annotated[str | None, typer.Option(help="Task id (default: generated); with --workflow, the workflow id (default: the file's).")] = None,
    region: Annotated[str | None, typer.Option(help="Region affinity.")] = None,
    region_failover: Annotated[
        str | None,
        typer.Option(
            "--region-failover",
            help="With --region: while that region has no live scheduler or worker, `wait` there or go to `any` healthy region "
            "[default: the region_failover setting, wait].",
        ),
    ] = None,
    depends_on: Annotated[list[str] | None, typer.Option("--depends-on", help="Id of a task that must succeed first (repeatable).")] = None,
    delay_s: Annotated[float | None, typer.Option("--delay-s", help="Start no earlier than this many seconds from now.")] = None,
    run_at: Annotated[str | None, typer.Option("--run-at", help="Start no earlier than this RFC 3339 time (with a zone).")] = None,
    deadline_s: Annotated[float | None, typer.Option("--deadline-s", help="No attempt starts later than this many seconds from now.")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="A key that stands for this task for idempotency_ttl_s: a later submit with it prints the first id."),
    ] = None,
    concurrency_key: Annotated[
        str | None,
        typer.Option("--concurrency-key", help="At most --concurrency-limit tasks with this key admitted and unfinished at once, cluster-wide."),
    ] = None,
    concurrency_limit: Annotated[
        int | None, typer.Option("--concurrency-limit", help="The limit of --concurrency-key [default: the concurrency_limits setting].")
    ] = None,
    rate_key: Annotated[str | None, typer.Option("--rate-key", help="Draw on this rate limit (a name in the rate_limits setting).")] = None,
    fairness_key: Annotated[
        str | None, typer.Option("--fairness-key", help="Tenant (or other label) whose tasks get their fair share (fairness_weights).")
    ] = None,
    workflow: Annotated[
        Path | None,
        typer.Option(help='Submit the DAG in this JSON or YAML file ({"id": ..., "tasks": [...]}, ids local to it) in one message.'),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the outcome (the state the projector writes to KV) and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait.")] = 60.0,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Submit the tasks of a JSON Lines file (one task envelope per line); prints their ids."),
    ] = None,
    atomic: Annotated[
        bool,
        typer.Option("--atomic", help=f"With --file: all tasks or none, as one batch (at most {MAX_BATCH_TASKS})."),
    ] = False,
) -> None:
    """Submit a task, a workflow (--workflow) or every task of a file (--file); prints the ids
    (and with --wait, the outcome).

    A file is checked whole first: every bad line is reported with its number and nothing is sent.

    When the TASKS stream is full the submission is tried again with backoff for
    $STREAMSCHED_SUBMIT_RETRY_BUDGET_S (default 5 s); if it stays full, one line names the
    limit and the exit code is 7: nothing of it was stored (with --file, the ids of the tasks
    stored before are printed). Other exit codes: 1 NATS unreachable, 2 bad input, 4 with
    --wait: the task did not succeed, 5 with --wait: no outcome in time.
    """
    settings = load_or_exit()
    if workflow is not None and file is not None:
        typer.echo("error: give --workflow or --file, not both", err=True)
        raise typer.Exit(Exit.USAGE)
    if workflow is not None:
        raise typer.Exit(anyio.run(_submit_workflow, settings, workflow, id, wait, timeout))
    if file is not None:
        raise typer.Exit(submit_file(settings, file, atomic=atomic))
    if type is None:
        typer.echo("error: give a task type, or --workflow FILE, or --file FILE", err=True)
        raise typer.Exit(Exit.USAGE)
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        typer.echo(f"error: --payload is not JSON: {exc}", err=True)
        raise typer.Exit(Exit.USAGE) from None

    async def go() -> int:
        async with await Client.connect(settings.nats_url, settings=settings) as client:
            handle = await client.submit(
                type,
                decoded,
                id=id,
                priority=priority,
                region=region,
                region_failover=region_failover,
                depends_on=depends_on or [],
                delay_s=delay_s,
                run_at=run_at,
                deadline_s=deadline_s,
                idempotency_key=idempotency_key,
                concurrency_key=concurrency_key,
                concurrency_limit=concurrency_limit,
                rate_key=rate_key,
                fairness_key=fairness_key,
            )
            typer.echo(handle.id)
            if not wait:
                return Exit.OK
            return await _print_outcome(client, handle.id, timeout, Status.SUCCEEDED)

    raise typer.Exit(anyio.run(go))


async def _submit_workflow(settings: Settings, path: Path, workflow_id: str | None, wait: bool, timeout: float) -> int:
    try:
        text = path.read_text()
        spec = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else msgspec.json.decode(text)
    except (OSError, yaml.YAMLError, msgspec.DecodeError) as exc:
        typer.echo(f"error: cannot read the workflow in {path}: {exc}", err=True)
        return Exit.USAGE
    if isinstance(spec, dict) and isinstance(spec.get("workflow"), dict):
        spec = spec["workflow"]  # the whole message, as published on tasks.submit
    if not isinstance(spec, dict):
        typer.echo(f'error: {path} holds no workflow object ({{"id": ..., "tasks": [...]}})', err=True)
        return Exit.USAGE
    if workflow_id is not None:
        spec["id"] = workflow_id
    async with await Client.connect(settings.nats_url, settings=settings) as client:
        handle = await client.submit_workflow(spec)
        typer.echo(handle.id)
        if not wait:
            return Exit.OK
        try:
            state = await handle.wait(timeout_s=timeout)
        except (TimeoutError, NotFound) as exc:
            rejected = await client.get(handle.id)  # a workflow refused as a whole is a rejected "task" of its id
            typer.echo(f"error: {rejected.error if rejected and rejected.error else exc}", err=True)
            return Exit.TASK_FAILED if rejected else Exit.TIMEOUT
        typer.echo(_encode_state(state))
        return Exit.OK if state.status == "succeeded" else Exit.TASK_FAILED


@app.command()
def status(
    task_id: Annotated[str, typer.Argument(help="Task id, or workflow id.")],
    json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
) -> None:
    """Show a task's current state, or a workflow's (its status, counts and tasks) when the id names one."""
    settings = load_or_exit()

    async def go() -> int:
        async with await Client.connect(settings.nats_url) as client:
            state: Any = await client.get_workflow(task_id) or await client.get(task_id)
        if state is None:
            typer.echo(f"no task {task_id}", err=True)
            return Exit.NOT_FOUND
        if json:
            typer.echo(_encode_state(state))
        else:
            for key, value in _state_dict(state).items():
                if key.endswith("_at"):
                    value = datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
                elif not isinstance(value, str):
                    value = msgspec.json.encode(value).decode()
                typer.echo(f"{key:<13} {value}")
        return Exit.OK

    raise typer.Exit(anyio.run(go))


@app.command(
    help=(
        "Cancel a task: a delayed, waiting or queued task never starts; a running one is cancelled (an async "
        "handler at its next await, a sync one when it checks current_task().cancelled). It ends `cancelled` "
        "with the reason. Given a workflow id, cancel every task of the workflow that has not finished.\n\n"
        f"Exit codes: {Exit.OK:d} requested (with --wait: the task or workflow ended cancelled), {Exit.NOT_FOUND:d} "
        f"no such task, {Exit.ALREADY_FINISHED:d} it had already finished (nothing changes), {Exit.TASK_FAILED:d} "
        f"with --wait: it finished otherwise, {Exit.TIMEOUT:d} with --wait: no outcome in time, "
        f"{Exit.OVERLOADED:d} the TASKS stream stayed full (the request was not stored)."
    )
)
def cancel(
    task_id: Annotated[str, typer.Argument(help="Task id, or workflow id.")],
    reason: Annotated[str, typer.Option(help="Why; recorded with the `cancelled` event.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the task's (or workflow's) final state and print it.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: seconds to wait.")] = 60.0,
) -> None:
    """``streamsched cancel`` (its help is above)."""
    settings = load_or_exit()

    async def go() -> int:
        async with await Client.connect(settings.nats_url, settings=settings) as client:
            try:
                state = await client.cancel(task_id, reason=reason)
            except NotFound as exc:
                typer.echo(f"error: {exc}", err=True)
                return Exit.NOT_FOUND
            except AlreadyFinished as exc:
                typer.echo(f"{exc}: nothing to cancel", err=True)
                return Exit.ALREADY_FINISHED
            if isinstance(state, WorkflowState):
                typer.echo(f"cancel requested for workflow {task_id} (it was {state.status})")
                return await _print_outcome(client, task_id, timeout, Status.CANCELLED, workflow=True) if wait else Exit.OK
            typer.echo(f"cancel requested for {task_id} (it was {state.status.value})")
            if not wait:
                return Exit.OK
            return await _print_outcome(client, task_id, timeout, Status.CANCELLED)

    raise typer.Exit(anyio.run(go))


@app.command(
    help=(
        "Change the priority of a task that has not started: a master moves it to the new level where it waits "
        "(queued on WORK: ahead of its old level's backlog; waiting for dependencies: released at the new level). "
        "It runs once, at the new level; a task that starts meanwhile runs at its old one.\n\n"
        f"Exit codes: {Exit.OK:d} requested, {Exit.USAGE:d} unknown priority, {Exit.NOT_FOUND:d} no such task, "
        f"{Exit.ALREADY_FINISHED:d} it had already finished, {Exit.OVERLOADED:d} the TASKS stream stayed full."
    )
)
def reprioritize(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    priority: Annotated[str, typer.Argument(help="The new priority (one of the settings' priorities, e.g. high).")],
) -> None:
    """``streamsched reprioritize`` (its help is above)."""
    settings = load_or_exit()

    async def go() -> int:
        async with await Client.connect(settings.nats_url, settings=settings) as client:
            try:
                state = await client.reprioritize(task_id, priority)
            except ValueError as exc:
                typer.echo(f"error: {exc}", err=True)
                return Exit.USAGE
            except NotFound as exc:
                typer.echo(f"error: {exc}", err=True)
                return Exit.NOT_FOUND
            except AlreadyFinished as exc:
                typer.echo(f"{exc}: its priority stays", err=True)
                return Exit.ALREADY_FINISHED
            typer.echo(f"reprioritize requested for {task_id}: {state.priority} -> {priority} (it was {state.status.value})")
            return Exit.OK

    raise typer.Exit(anyio.run(go))


@app.command()
def bench(
    scenario: Annotated[
        str,
        typer.Argument(
            help="throughput, latency, priority, ingress, backlog, ceiling, dag (a random 10,000-task DAG, small DAGs at 250 tasks/s and a "
            "1,000-chunk split), fairness (tenant B's 1/s trickle under tenant A's 50,000-task flood, with and without fairness keys), "
            "api (listing tasks over REST with 100,000 in KV), "
            "peers (needs the peers extra; three rounds in turns with throughput, medians compared) or all."
        ),
    ],
    quick: Annotated[bool, typer.Option("--quick", help="A tenth of the task counts and one round of peers, for a smoke run.")] = False,
    ceiling: Annotated[bool, typer.Option("--ceiling/--no-ceiling", help="Measure the raw engine in the same run (throughput, latency).")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes per region.")] = 1,
    masters: Annotated[int, typer.Option(min=1, help="Master processes.")] = 1,
    projectors: Annotated[int, typer.Option(min=1, max=MAX_PROJECTOR_PARTITIONS, help="Projector processes, one per projector partition.")] = 1,
    regionals: Annotated[int, typer.Option(min=1, help="Regional scheduler processes per region.")] = 1,
    regions: Annotated[
        int, typer.Option(min=1, help="Regions (default; r1, r2 ... with more than one), tasks spread over them by their region field.")
    ] = 1,
    concurrency: Annotated[int | None, typer.Option(help="Handler slots per worker [default: 100, as `worker` and `up`].")] = None,
    prefetch: Annotated[int | None, typer.Option(min=0, help="Tasks per worker waiting for a slot [default: the worker's].")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON results.")] = Path("bench/results"),
) -> None:
    """Run a benchmark on its own nats-server; prints a table and writes JSON results."""
    from . import bench as bench_mod

    if scenario not in bench_mod.SCENARIOS:
        typer.echo(f"error: unknown scenario {scenario!r} (one of {', '.join(bench_mod.SCENARIOS)})", err=True)
        raise typer.Exit(Exit.USAGE)
    configure_logging("WARNING")
    roles = bench_mod.Roles(
        workers=workers, concurrency=concurrency, prefetch=prefetch, masters=masters, regionals=regionals, projectors=projectors, regions=regions
    )
    results = anyio.run(lambda: bench_mod.run(scenario, quick=quick, with_ceiling=ceiling, roles=roles))
    typer.echo(bench_mod.report(results))
    typer.echo(f"results: {bench_mod.save(results, out)}")


async def _print_outcome(client: Client, task_id: str, timeout: float, expected: Status, *, workflow: bool = False) -> int:
    """Wait for the task's (or ``workflow``'s) final state and print it; the exit code says
    whether it is ``expected``."""
    state: TaskState | WorkflowState
    try:
        state = await (client.wait_workflow(task_id, timeout_s=timeout) if workflow else client.wait(task_id, timeout_s=timeout))
    except (TimeoutError, NotFound) as exc:
        typer.echo(f"error: {exc}", err=True)
        return Exit.TIMEOUT
    typer.echo(_encode_state(state))
    return Exit.OK if state.status == expected else Exit.TASK_FAILED


def _projector_consumer(settings: Settings, partition: int | None) -> str:
    """The durable a projector reads: the one of ``--partition``, which must name one of the
    settings' partitions, or, with one partition, the projector's only durable."""
    partitions = settings.projector_partitions
    if partitions == 1 and partition is None:
        return subjects.PROJECTOR_CONSUMER
    if partitions == 1:
        typer.echo("error: --partition needs STREAMSCHED_PROJECTOR_PARTITIONS above 1 (it is 1: one projector durable)", err=True)
        raise typer.Exit(Exit.USAGE)
    if partition is None or not 0 <= partition < partitions:
        given = "no --partition" if partition is None else f"--partition {partition}"
        typer.echo(f"error: {given}: STREAMSCHED_PROJECTOR_PARTITIONS is {partitions}, so give --partition 0 to {partitions - 1}", err=True)
        raise typer.Exit(Exit.USAGE)
    return subjects.projector_consumer(partition)


def _check_region(settings: Settings, region: str) -> None:
    if region not in settings.regions:
        typer.echo(f"error: region {region!r} is not in STREAMSCHED_REGIONS ({', '.join(settings.regions)})", err=True)
        raise typer.Exit(Exit.USAGE)


def _state_dict(state: Any) -> dict[str, Any]:
    """The state as plain JSON values, without the projector's internal ``rank``."""
    raw: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(state))
    raw.pop("rank", None)
    return raw


def _encode_state(state: Any) -> str:
    return msgspec.json.encode(_state_dict(state)).decode()


def main() -> None:
    try:
        app()
    except Unavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(Exit.ERROR)
    except Overloaded as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(Exit.OVERLOADED)
    except KeyboardInterrupt:
        sys.exit(130)
