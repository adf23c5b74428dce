"""CLI commands over the event log: schema, events tail, task history, dlq, replay.

Registered on the main app by :mod:`streamsched.cli`; kept apart so each file stays small.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
import typer
from nats.js.api import StreamInfo

from . import subjects
from .config import Settings
from .errors import ConfigError
from .eventlog import dlq as dlq_mod
from .eventlog import events as ev
from .eventlog import reader as eventlog
from .eventlog.replay import replay_submissions
from .roles.rebuild import compare_states, rebuild_state
from .transport.bus import Bus
from .transport.reading import ReadStats, Since

T = TypeVar("T")

schema_app = typer.Typer(help="Print JSON Schemas of the wire formats.", no_args_is_help=True)
events_app = typer.Typer(help="Read the event log (stream EVENTS).", no_args_is_help=True)
task_app = typer.Typer(help="Look at one task.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead tasks: list, show, re-drive.", no_args_is_help=True)
replay_app = typer.Typer(help="Rebuild state from EVENTS; replay submissions elsewhere.", no_args_is_help=True)

SinceOpt = Annotated[str | None, typer.Option("--since", help="10m / 2h / 1d ago, a stream sequence, or an RFC 3339 time.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON lines instead of readable lines.")]


def load_or_exit(**overrides: Any) -> Settings:
    """Settings from the environment (and overrides); a clear error and exit 2 if they are wrong."""
    try:
        return Settings.load(**overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _with_bus(settings: Settings, work: Callable[[Bus], Awaitable[T]], name: str = "streamsched-cli") -> T:
    async def go() -> T:
        bus = await Bus.connect(settings.nats_url, name=name)
        try:
            return await work(bus)
        finally:
            await bus.close()

    return anyio.run(go)


def _since(text: str | None) -> Since:
    try:
        return Since.parse(text)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _record_json(record: eventlog.Record) -> str:
    body = msgspec.json.decode(ev.encode(record.event))
    return jsonlib.dumps({"seq": record.seq, "stored_at": record.stored_at, **body})


@schema_app.command("events")
def schema_events() -> None:
    """The JSON Schema of an EVENTS message: one event (a tagged union on `kind`) or an array of them."""
    typer.echo(msgspec.json.encode(msgspec.json.schema(ev.EventMessage)).decode())


@schema_app.command("envelope")
def schema_envelope() -> None:
    """The JSON Schema of a submission to tasks.submit."""
    from .model import Envelope

    typer.echo(msgspec.json.encode(msgspec.json.schema(Envelope)).decode())


@events_app.command("tail")
def events_tail(
    task: Annotated[str | None, typer.Option("--task", help="Only this task id.")] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help=f"Only this kind ({', '.join(ev.KINDS)}).")] = None,
    since: SinceOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events.")] = False,
    json: JsonOpt = False,
) -> None:
    """Print events, oldest first (by default the whole log; narrow with --since)."""
    if kind is not None and kind not in ev.KINDS:
        typer.echo(f"error: unknown kind {kind!r} (one of {', '.join(ev.KINDS)})", err=True)
        raise typer.Exit(2)
    settings = load_or_exit()
    start = _since(since)

    async def work(bus: Bus) -> int:
        stats = ReadStats()
        async for record in eventlog.tail(bus, task_id=task, kind=kind, task_type=task_type, since=start, follow=follow, stats=stats):
            typer.echo(_record_json(record) if json else eventlog.format_record(record))
        if stats.skipped:
            typer.echo(f"warning: skipped {stats.skipped} undecodable or unknown-version event(s)", err=True)
        return 0

    _with_bus(settings, work)


@task_app.command("history")
def task_history(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    json: JsonOpt = False,
) -> None:
    """The whole timeline of one task, with the time between steps."""
    settings = load_or_exit()
    records = _with_bus(settings, lambda bus: eventlog.history(bus, task_id))
    if not records:
        typer.echo(f"no events for task {task_id}", err=True)
        raise typer.Exit(3)
    previous = None
    for record in records:
        typer.echo(_record_json(record) if json else eventlog.format_record(record, previous))
        previous = record
    if not json and len(records) > 1:
        typer.echo(f"total {1000 * (records[-1].event.at - records[0].event.at):.1f} ms over {len(records)} events")


@dlq_app.command("list")
def dlq_list(
    task_type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    since: SinceOpt = None,
    json: JsonOpt = False,
) -> None:
    """Dead tasks, oldest first."""
    settings = load_or_exit()

    async def work(bus: Bus) -> list[dlq_mod.DeadTask]:
        return [entry async for entry in dlq_mod.entries(bus, task_type=task_type, since=_since(since))]

    for entry in _with_bus(settings, work):
        if json:
            typer.echo(jsonlib.dumps({k: v for k, v in vars(entry).items() if k != "body"} | {"body": entry.body.decode(errors="replace")}))
        else:
            when = datetime.fromtimestamp(entry.stored_at, UTC).isoformat(timespec="seconds")
            typer.echo(f"{when}  #{entry.seq:<6} {entry.task_id:<26} {entry.type:<16} attempts={entry.attempts}  {entry.error[:120]}")


@dlq_app.command("show")
def dlq_show(task_id: Annotated[str, typer.Argument(help="Task id.")]) -> None:
    """One dead task: its last error and its original submission."""
    settings = load_or_exit()
    entry = _with_bus(settings, lambda bus: dlq_mod.show(bus, task_id))
    if entry is None:
        typer.echo(f"task {task_id} is not in the DLQ", err=True)
        raise typer.Exit(3)
    typer.echo(f"task       {entry.task_id}\ntype       {entry.type}\nattempts   {entry.attempts}\nDLQ seq    {entry.seq}")
    typer.echo(f"error      {entry.error}\nsubmission {entry.body.decode(errors='replace')}")


@dlq_app.command("redrive")
def dlq_redrive(
    task_type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    since: SinceOpt = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead task (needed when no filter is given).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be re-driven; change nothing.")] = False,
) -> None:
    """Submit dead tasks again as new tasks (id <id>-r<seq>, label redrive_of); safe to run again."""
    if not (all_ or task_type or since):
        typer.echo("error: choose --type, --since, or --all", err=True)
        raise typer.Exit(2)
    settings = load_or_exit()

    async def work(bus: Bus) -> dlq_mod.RedriveReport:
        dead = [entry async for entry in dlq_mod.entries(bus, task_type=task_type, since=_since(since))]
        if not dead:
            return dlq_mod.RedriveReport()
        with typer.progressbar(length=len(dead), label="re-driving", file=None) as bar:
            return await dlq_mod.redrive(bus, dead, dry_run=dry_run, progress=bar.update, retry_budget_s=settings.submit_retry_budget_s)

    report = _with_bus(settings, work)
    verb = "would re-drive" if dry_run else "re-drove"
    typer.echo(f"{verb} {len(report.redriven)}; already re-driven {len(report.already_redriven)}; unreadable {len(report.unreadable)}")
    for new_id in report.redriven:
        typer.echo(f"  {new_id}")


@replay_app.command("rebuild-state")
def replay_rebuild_state(
    into: Annotated[str, typer.Option("--into", help="Bucket to build; `tasks` (the live one) is wiped and rebuilt.")] = subjects.STATE_BUCKET,
    compare: Annotated[str | None, typer.Option("--compare", help="Afterwards, list tasks whose state differs from this bucket.")] = None,
) -> None:
    """Fold every event in EVENTS into a task-state bucket again."""
    settings = load_or_exit()

    async def work(bus: Bus) -> tuple[Any, list[str]]:
        report = await rebuild_state(bus, settings, bucket=into)
        diff = await compare_states(bus, into, compare) if compare else []
        return report, diff

    report, diff = _with_bus(settings, work)
    typer.echo(f"rebuilt {report.bucket}: {report.tasks} tasks from {report.events} events in {report.seconds:.1f}s; skipped {report.skipped}")
    if compare:
        typer.echo(f"{len(diff)} task(s) differ from {compare}")
        for line in diff[:50]:
            typer.echo(f"  {line}")
        if diff:
            raise typer.Exit(1)


@replay_app.command("submissions")
def replay_submissions_cmd(
    to: Annotated[str | None, typer.Option("--to", help="NATS URL of the target deployment.")] = None,
    since: SinceOpt = None,
    until: Annotated[str | None, typer.Option("--until", help="RFC 3339 time (default: now).")] = None,
    task_type: Annotated[str | None, typer.Option("--type", help="Only tasks of this type.")] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="At most this many submissions per second.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be sent; send nothing.")] = False,
) -> None:
    """Replay the original submissions of a window from TASKS into another deployment."""
    if to is None and not dry_run:
        typer.echo("error: --to URL is required (or --dry-run)", err=True)
        raise typer.Exit(2)
    settings = load_or_exit()
    start = _since(since)
    end = Since.parse(until).time if until else None

    async def work(source: Bus) -> Any:
        target = None
        if not dry_run:
            try:
                with anyio.fail_after(10):
                    target = await Bus.connect(to or "", name="streamsched-replay")
                await target.js.key_value(subjects.STATE_BUCKET)
            except Exception as exc:  # noqa: BLE001 - any reason the target cannot take work
                if target is not None:
                    await target.close()
                raise typer.BadParameter(f"target {to} is not a reachable streamsched deployment: {exc!r}", param_hint="--to") from None
        try:
            total = await _count(source)
            with typer.progressbar(length=total, label="replaying") as bar:
                return await replay_submissions(
                    source,
                    target,
                    since=start,
                    until=end,
                    task_type=task_type,
                    rate_per_s=rate,
                    progress=bar.update,
                    retry_budget_s=settings.submit_retry_budget_s,
                )
        finally:
            if target is not None:
                await target.close()

    report = _with_bus(settings, work)
    if dry_run:
        typer.echo(f"would replay {report.selected} submission(s)")
    else:
        typer.echo(f"replayed {report.sent}; already there {report.already_there}; skipped invalid {report.skipped_invalid}")


async def _count(bus: Bus) -> int:
    """Submissions in TASKS: the progress bar's length (an upper bound for a window)."""
    info: StreamInfo = await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=">")
    return sum(count for subject, count in (info.state.subjects or {}).items() if subjects.is_submit(subject))
