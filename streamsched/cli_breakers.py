"""``streamsched breakers``: the circuit breakers per task type and region (list), forced
open or closed by an operator (open, close).

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
from .roles.breakers import Breaker

breakers_app = typer.Typer(
    help=(
        "Circuit breakers per task type and region (KV `breakers`). A breaker opens after "
        "breaker_failures_in_row failures in a row, or a failure share of breaker_failure_rate "
        "(both off by default), holds its type's tasks on WORK for breaker_cooldown_s (undelivered: "
        "nothing is failed or dead-lettered), then half-opens with breaker_probes tasks at a time, "
        "and closes on a success. Other types keep flowing."
    ),
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n"
        "  streamsched breakers list\n\n"
        "  streamsched breakers open send_email --region eu --for 600\n\n"
        "  streamsched breakers close send_email"
    ),
)

HEADER = ("REGION", "TYPE", "STATE", "SINCE", "UNTIL", "REASON")


def table(breakers: Sequence[Breaker], now: float) -> str:
    """The breakers as aligned columns, a header first."""
    rows = [HEADER] + [
        (
            b.region,
            b.type,
            b.state + (" (forced)" if b.forced else ""),
            f"{max(0.0, now - b.since):.0f}s ago",
            (f"in {max(0.0, b.until - now):.0f}s" if b.until else "until closed") if b.state == "open" else "-",
            b.reason,
        )
        for b in breakers
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


@breakers_app.command("list")
def list_(json: Annotated[bool, typer.Option("--json", help="One JSON object per breaker (its KV value, with its history).")] = False) -> None:
    """Every breaker that ever opened: region, type, state, since when, until when (open), and why."""
    settings = load_or_exit()

    async def go() -> list[Breaker]:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            return await client.breakers()

    breakers = anyio.run(go)
    if json:
        for breaker in breakers:
            typer.echo(msgspec.json.encode(breaker).decode())
    elif breakers:
        typer.echo(table(breakers, time.time()))
    else:
        typer.echo("no breakers (none has opened)", err=True)


RegionOption = Annotated[str | None, typer.Option("--region", help="One region [default: every configured region].")]


@breakers_app.command("open")
def open_(
    task_type: Annotated[str, typer.Argument(help="The task type.")],
    region: RegionOption = None,
    for_s: Annotated[float | None, typer.Option("--for", help="Seconds until it half-opens [default: until `breakers close`].", min=0.1)] = None,
) -> None:
    """Force a breaker open: the type's tasks wait on WORK, undelivered, until it half-opens
    (--for) or is closed."""
    _force(task_type, region, "open", for_s)


@breakers_app.command("close")
def close(task_type: Annotated[str, typer.Argument(help="The task type.")], region: RegionOption = None) -> None:
    """Force a breaker closed: the type's tasks flow again at once, and its failures are counted afresh."""
    _force(task_type, region, "closed", None)


def _force(task_type: str, region: str | None, state: str, for_s: float | None) -> None:
    settings = load_or_exit()

    async def go() -> list[Breaker]:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            if state == "open":
                return await client.open_breaker(task_type, region=region, for_s=for_s)
            return await client.close_breaker(task_type, region=region)

    typer.echo(table(anyio.run(go), time.time()))
