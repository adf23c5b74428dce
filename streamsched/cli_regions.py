"""``streamsched regions``: each region's regional schedulers, workers and room, as the masters route by them.

Registered on the main app by :mod:`streamsched.cli`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import anyio
import msgspec
import typer

from .cli_events import load_or_exit
from .client import Client
from .roles.routing import RegionHealth

regions_app = typer.Typer(
    help="The regions (KV `regions`): their live schedulers and workers, capacity and backlog, healthy or not.",
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n"
        "  streamsched regions list\n\n"
        "  STREAMSCHED_REGIONS=eu,us streamsched regions list --json | jq -r 'select(.healthy | not) | .region'"
    ),
)

HEADER = ("REGION", "HEALTHY", "SCHEDULERS", "WORKERS", "RUNNING", "WAITING", "BACKLOG", "ACK_PENDING", "HEADROOM", "REPORTED")


def table(regions: Sequence[RegionHealth], now: float) -> str:
    """The regions as aligned columns, a header first; a region outside the settings' list is marked ``*``."""
    rows = [HEADER] + [
        (
            health.region + ("" if health.configured else "*"),
            "yes" if health.healthy else f"no: {health.problem}",
            ",".join(health.schedulers) or "-",
            str(health.workers),
            f"{health.running}/{health.capacity}",
            str(health.waiting),
            str(health.backlog),
            str(health.ack_pending),
            str(health.headroom),
            "-" if health.reported_at is None else f"{max(0.0, now - health.reported_at):.1f}s ago",
        )
        for health in regions
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not all(health.configured for health in regions):
        lines.append("* served by a live regional scheduler, but not in this command's regions (STREAMSCHED_REGIONS)")
    return "\n".join(lines)


def as_json(health: RegionHealth) -> dict[str, Any]:
    """A region's line of ``--json``: its fields, and whether it is healthy, why not, its headroom."""
    return {**msgspec.structs.asdict(health), "healthy": health.healthy, "problem": health.problem, "headroom": health.headroom}


@regions_app.command("list")
def list_(json: Annotated[bool, typer.Option("--json", help="One JSON object per region.")] = False) -> None:
    """Each region: live schedulers and workers, capacity, backlog, healthy or not.

    Every configured region (STREAMSCHED_REGIONS), then any other a live regional scheduler
    serves: its live schedulers, its live workers (running/capacity: tasks in handlers out of
    their slots; waiting: held in workers for a slot), its WORK backlog and ack-pending tasks,
    its headroom (capacity - running - waiting - backlog) and when that was measured.

    A region is healthy with at least one live regional scheduler and one live worker; the
    masters send tasks that name no region to healthy ones, by headroom (see the README,
    "Regions"). Figures are the newest heartbeat of the region's schedulers
    (worker_heartbeat_s); a scheduler or worker that vanished drops out within three."""
    settings = load_or_exit()

    async def go() -> list[RegionHealth]:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            return await client.regions()

    regions = anyio.run(go)
    if json:
        for health in regions:
            typer.echo(msgspec.json.encode(as_json(health)).decode())
    else:
        typer.echo(table(regions, time.time()))
