"""``streamsched workers``: the live workers (list) and taking one out of service (drain).

Registered on the main app by :mod:`streamsched.cli`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated

import anyio
import msgspec
import typer

from .cli_events import load_or_exit
from .client import Client
from .errors import NotFound
from .roles import worker_registry
from .roles.worker_registry import WorkerInfo

#: Exit codes of these commands, as :class:`streamsched.cli.Exit` names them (that module
#: imports this one, so they are repeated here; a test holds them equal).
NOT_FOUND = 3
TIMEOUT = 5
#: With no ``--timeout``, ``drain`` waits the deployment's ``grace_s`` plus this long.
DRAIN_MARGIN_S = 10.0

workers_app = typer.Typer(
    help="The live workers (KV `workers`): what runs where and how busy; drain one.",
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n"
        "  streamsched workers list\n\n"
        "  streamsched workers list --json | jq -r 'select(.region == \"eu\") | .id'\n\n"
        "  streamsched workers drain myhost-4242 --timeout 120"
    ),
)

HEADER = ("ID", "REGION", "TYPES", "STATE", "RUNNING", "WAITING", "FINISHED", "AGE", "HEARTBEAT")


def table(workers: Sequence[WorkerInfo], now: float) -> str:
    """The workers as aligned columns, a header first."""
    rows = [HEADER] + [
        (
            info.id,
            info.region,
            ",".join(info.types) or "-",
            info.state,
            f"{info.running}/{info.concurrency}",
            str(info.waiting),
            " ".join(f"{outcome} {count}" for outcome, count in info.finished.items() if count) or "-",
            _duration(now - info.started_at),
            f"{max(0.0, now - info.heartbeat_at):.1f}s ago",
        )
        for info in workers
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``, ``4d07h``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


@workers_app.command("list")
def list_(json: Annotated[bool, typer.Option("--json", help="One JSON object per worker (its registry entry).")] = False) -> None:
    """Every live worker: id, region, handler types, state, running/concurrency, waiting, finished
    counts, age and last heartbeat. A worker that stopped heartbeating leaves the list within
    three heartbeats (worker_heartbeat_s)."""
    settings = load_or_exit()

    async def go() -> list[WorkerInfo]:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            return await client.workers()

    workers = anyio.run(go)
    if json:
        for info in workers:
            typer.echo(msgspec.json.encode(info).decode())
    elif workers:
        typer.echo(table(workers, time.time()))
    else:
        typer.echo("no live workers", err=True)


@workers_app.command(
    "drain",
    help=(
        "Take a worker out of service: it fetches nothing more, lets the tasks it holds finish within its grace_s "
        "(the rest go back to the queue for other workers), deregisters and exits with code 0. Its state shows "
        "`draining` meanwhile. This command waits until it has deregistered.\n\n"
        "Under `streamsched up`, which keeps its role processes running, a new worker process starts in its place: "
        "a graceful restart (for new handler code, say).\n\n"
        f"Exit codes: 0 drained, {NOT_FOUND} no live worker has that id, {TIMEOUT} it did not answer, or had not "
        "deregistered by --timeout (it goes on draining)."
    ),
)
def drain(
    worker_id: Annotated[str, typer.Argument(help="Worker id, as `workers list` shows it.")],
    timeout: Annotated[
        float | None,
        typer.Option(help=f"Seconds to wait for it to deregister [default: grace_s + {DRAIN_MARGIN_S:g}].", min=0),
    ] = None,
) -> None:
    """``streamsched workers drain`` (its help is above)."""
    settings = load_or_exit()
    wait_s = settings.grace_s + DRAIN_MARGIN_S if timeout is None else timeout

    async def go() -> int:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            try:
                info = await client.drain_worker(worker_id)
            except NotFound as exc:
                typer.echo(f"error: {exc}", err=True)
                return NOT_FOUND
            except TimeoutError:
                typer.echo(f"error: worker {worker_id} did not answer within {worker_registry.DRAIN_ANSWER_TIMEOUT_S:g}s", err=True)
                return TIMEOUT
            typer.echo(f"draining {info.id}: {info.running} running, {info.waiting} waiting; waiting up to {wait_s:g}s for it to deregister")
            if await worker_registry.wait_gone(client.bus, worker_id, timeout_s=wait_s):
                typer.echo(f"drained {info.id}")
                return 0
            typer.echo(f"error: worker {info.id} still registered after {wait_s:g}s; it goes on draining (see `streamsched workers list`)", err=True)
            return TIMEOUT

    raise typer.Exit(anyio.run(go))
