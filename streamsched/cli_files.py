"""``streamsched submit --file tasks.jsonl``: many tasks from a JSON Lines file.

Every line is checked first, as the master will check it; bad lines are reported with
their numbers and nothing is sent. Then the tasks go in chunks with a progress bar, or
with ``--atomic`` as one batch that the master takes all or nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import typer
from rich.console import Console
from rich.progress import Progress

from .client import Client, TaskHandle, prepare
from .config import Settings
from .errors import Overloaded, Rejected
from .roles.batches import MAX_TASKS as MAX_BATCH_TASKS

__all__ = ["MAX_BATCH_TASKS", "submit_file"]

#: Tasks sent between two updates of the progress bar.
CHUNK = 500
#: Exit codes (the same numbers as :class:`streamsched.cli.Exit`).
_OK, _USAGE, _OVERLOADED = 0, 2, 7


def read_tasks(path: Path, settings: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """The tasks of ``path`` (each with its id filled in) and one message per bad line."""
    tasks: list[dict[str, Any]] = []
    errors: list[str] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                spec = msgspec.json.decode(line)
                if not isinstance(spec, dict):
                    raise Rejected("not a JSON object")
                task_id, _ = prepare(spec, settings)
            except (msgspec.DecodeError, Rejected, TypeError) as exc:
                errors.append(f"line {number}: {exc}")
                continue
            tasks.append({**spec, "id": task_id})
    return tasks, errors


def submit_file(settings: Settings, path: Path, *, atomic: bool) -> int:
    """Check and submit the tasks of ``path``; prints their ids. Returns the exit code."""
    try:
        tasks, errors = read_tasks(path, settings)
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        return _USAGE
    for error in errors:
        typer.echo(f"error: {path}:{error}", err=True)
    if errors:
        typer.echo(f"error: {len(errors)} bad line(s); nothing was submitted", err=True)
        return _USAGE
    if atomic and len(tasks) > MAX_BATCH_TASKS:
        typer.echo(f"error: --atomic takes at most {MAX_BATCH_TASKS} tasks, the file holds {len(tasks)}", err=True)
        return _USAGE

    handles: list[TaskHandle] = []

    async def go() -> None:
        async with await Client.connect(settings.nats_url, name="streamsched-cli", settings=settings) as client:
            if atomic:
                handles.extend(await client.submit_many(tasks, atomic=True))
                return
            with Progress(transient=True, console=Console(stderr=True)) as progress:  # stdout is for the ids
                bar = progress.add_task("submitting", total=len(tasks))
                for start in range(0, len(tasks), CHUNK):
                    handles.extend(await client.submit_many(tasks[start : start + CHUNK]))
                    progress.advance(bar, min(CHUNK, len(tasks) - start))

    refused: Overloaded | None = None
    try:
        anyio.run(go)
    except Overloaded as exc:  # the chunks before it were stored: theirs are the ids printed
        refused = exc
    for handle in handles:
        typer.echo(handle.id)
    if refused is None:
        return _OK
    typer.echo(f"error: {refused}", err=True)
    if not atomic:  # a batch is stored whole or not at all
        known, rest = len(handles), len(tasks) - len(handles)
        typer.echo(f"error: {known} of {len(tasks)} tasks are known to be stored (ids printed); some of the other {rest} may be too", err=True)
    return _OVERLOADED
