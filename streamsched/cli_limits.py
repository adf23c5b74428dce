"""``streamsched limits``: tasks held back by concurrency keys, rate limits and fair shares.

Registered on the main app by :mod:`streamsched.cli`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import anyio
import msgspec
import typer

from .cli_events import load_or_exit
from .client import Client
from .roles.limits import KeyInUse, Lane

limits_app = typer.Typer(
    help=(
        "Concurrency keys, rate limits and fair shares (KV `limits`). A task under one waits in its lane "
        "(one per region, type, priority and limits), using no worker slot and no attempt, until its "
        "limits let a regional scheduler admit it onto WORK."
    ),
    no_args_is_help=True,
    epilog="Examples:\n\n  streamsched limits list\n\n  streamsched limits list --json | jq 'select(.parked > 100)'",
)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows)


def table(lanes: Sequence[Lane], keys: Sequence[KeyInUse]) -> str:
    """The lanes, then the concurrency keys in use, as aligned columns."""
    parts = []
    if lanes:
        header = ("REGION", "TYPE", "PRIORITY", "PARKED", "WAITING FOR")
        parts.append(_columns([header, *((lane.region, lane.type, lane.priority, str(lane.parked), lane.waiting_for) for lane in lanes)]))
    if keys:
        parts.append(_columns([("CONCURRENCY KEY", "SLOTS HELD"), *((key.key, str(key.held)) for key in keys)]))
    return "\n\n".join(parts)


@limits_app.command("list")
def list_(json: Annotated[bool, typer.Option("--json", help="One JSON object per lane, then one per concurrency key in use.")] = False) -> None:
    """The lanes that hold tasks (region, type, priority, how many, what they wait for) and the concurrency keys whose slots are held."""
    settings = load_or_exit()

    async def go() -> tuple[list[Lane], list[KeyInUse]]:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            return await client.limits()

    lanes, keys = anyio.run(go)
    if json:
        for item in [*lanes, *keys]:
            typer.echo(msgspec.json.encode(item).decode())
    elif lanes or keys:
        typer.echo(table(lanes, keys))
    else:
        typer.echo("nothing held back: no task waits in a lane and no concurrency key's slot is held", err=True)
