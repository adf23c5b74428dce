"""``streamsched schedule``: cron schedules (add, list, remove, pause, resume).

Registered on the main app by :mod:`streamsched.cli`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import anyio
import msgspec
import typer

from .cli_events import load_or_exit
from .client import Client
from .errors import NotFound, Rejected
from .model import DEFAULT_PRIORITY
from .roles.schedules import Schedule

T = TypeVar("T")

schedule_app = typer.Typer(
    help="Cron schedules: a new task at every slot, timed by nats-server.",
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n"
        "  streamsched schedule add tick --cron '*/5 * * * * *' --type echo --payload '{\"n\": 1}'\n\n"
        "  streamsched schedule add nightly --cron '0 0 3 * * *' --tz Europe/Berlin --type report.build\n\n"
        "  streamsched schedule pause nightly"
    ),
)


def _run(work: Callable[[Client], Awaitable[T]]) -> T:
    settings = load_or_exit()

    async def go() -> T:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            return await work(client)

    try:
        return anyio.run(go)
    except (Rejected, NotFound) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3 if isinstance(exc, NotFound) else 2) from None


def _line(schedule: Schedule) -> str:
    zone = f" ({schedule.time_zone})" if schedule.time_zone else ""
    state = "paused" if schedule.paused else "active"
    # The template's fields that are set (its envelope spells out every default).
    fields = {k: v for k, v in msgspec.json.decode(schedule.template).items() if v not in (None, [], {})}
    return f"{schedule.name:<24} {state:<7} {schedule.cron}{zone}  {msgspec.json.encode(fields).decode()}"


@schedule_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Schedule name (A-Z a-z 0-9 _ -, up to 100); each slot's task id is <name>-<slot time>.")],
    cron: Annotated[str, typer.Option("--cron", help="6-field cron, seconds first ('0 */5 * * * *'), @hourly-style, or '@every 30s'.")],
    type: Annotated[str, typer.Option("--type", help="Task type (handler name).")],
    payload: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    priority: Annotated[str, typer.Option(help="high, medium or low.")] = DEFAULT_PRIORITY,
    region: Annotated[str | None, typer.Option(help="Region affinity.")] = None,
    tz: Annotated[str | None, typer.Option("--tz", help="IANA time zone of the cron fields (default UTC).")] = None,
    deadline_s: Annotated[float | None, typer.Option(help="Each slot's task must start within this many seconds.")] = None,
) -> None:
    """Add a schedule; refused with the reason (nothing stored) when it cannot be honoured."""
    try:
        decoded = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        typer.echo(f"error: --payload is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    schedule = _run(
        lambda client: client.add_schedule(name, cron, type, decoded, time_zone=tz, priority=priority, region=region, deadline_s=deadline_s)
    )
    typer.echo(_line(schedule))


@schedule_app.command("list")
def list_(json: Annotated[bool, typer.Option("--json", help="One JSON object per schedule.")] = False) -> None:
    """Every schedule: name, active or paused, pattern, task template."""
    for schedule in _run(lambda client: client.list_schedules()):
        typer.echo(msgspec.json.encode(schedule).decode() if json else _line(schedule))


@schedule_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Stop a schedule and delete its definition."""
    _run(lambda client: client.remove_schedule(name))
    typer.echo(f"removed {name}")


@schedule_app.command("pause")
def pause(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Make no more tasks until resumed (the definition is kept)."""
    typer.echo(_line(_run(lambda client: client.pause_schedule(name))))


@schedule_app.command("resume")
def resume(name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Make tasks again from the next slot."""
    typer.echo(_line(_run(lambda client: client.resume_schedule(name))))
