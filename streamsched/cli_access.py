"""``streamsched access``: the NATS users of a secured deployment and what each may do.

Registered on the main app by :mod:`streamsched.cli`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import typer

from .cli_events import load_or_exit

access_app = typer.Typer(
    help=(
        "NATS users per role with least-privilege permissions (see deploy/nats/). Each role process "
        "gives its own with NATS_USER and NATS_PASSWORD (or NATS_CREDS), read from the environment."
    ),
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n  STREAMSCHED_REGIONS=default,eu streamsched access render > accounts.conf\n\n"
        "  streamsched access render --handlers workers.examples   # workers pull only these types' durables"
    ),
)


@access_app.command("render")
def render(
    handlers: Annotated[
        list[str] | None,
        typer.Option(help="Modules with the @task handlers the workers load: each region's workers may then pull only those types' durables."),
    ] = None,
) -> None:
    """Print the `accounts` block of a nats-server config: a user per role (and per region for
    schedulers and workers), each password read by nats-server from NATS_PASSWORD_<USER>."""
    from .access import render as render_accounts
    from .registry import Registry

    settings = load_or_exit()
    task_types: dict[str, Sequence[str]] | None = None
    if handlers:
        names = Registry.from_modules(handlers).names()
        task_types = dict.fromkeys(settings.regions, names)
    typer.echo(render_accounts(settings, task_types), nl=False)
