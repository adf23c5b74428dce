"""``streamsched streams``: apply the definition files (``streams/``) to JetStream, show what
the streams hold, or render the definitions for another tool (NACK in Kubernetes).

Registered on the main app by :mod:`streamsched.cli`.
"""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any

import anyio
import nats.js.errors
import typer

from .cli_events import load_or_exit
from .config import Settings
from .transport import streams
from .transport.bus import Bus, explain

streams_app = typer.Typer(
    help=(
        "Create, update, inspect and render the JetStream streams, KV buckets and durable consumers defined in streams/ "
        "(JetStream API shapes with the settings they depend on filled in)."
    ),
    no_args_is_help=True,
    epilog=(
        "Examples:\n\n  streamsched streams apply --replicas 3\n\n"
        "  streamsched streams render --format nack --replicas 3 --namespace streamsched > streams.yaml\n\n"
        "  STREAMSCHED_REGIONS=us,eu streamsched streams render --format json"
    ),
)

Regions = Annotated[str | None, typer.Option(help="Comma-separated regions [default: $STREAMSCHED_REGIONS or default].")]
Replicas = Annotated[
    int | None,
    typer.Option(min=1, help="Replicas of every stream and bucket [default: $STREAMSCHED_REPLICAS or 1; 3 for a cluster]."),
]


#: JetStream's error code when the streams' limits ask for more storage than the server has.
INSUFFICIENT_RESOURCES = 10047


class Format(enum.StrEnum):
    """What ``streams render`` prints."""

    NACK = "nack"
    JSON = "json"


def _settings(regions: str | None, replicas: int | None) -> Settings:
    overrides: dict[str, Any] = {}
    if regions:
        overrides["regions"] = tuple(region.strip() for region in regions.split(",") if region.strip())
    if replicas is not None:
        overrides["replicas"] = replicas
    return load_or_exit(**overrides)


@streams_app.command("apply")
def apply(
    regions: Regions = None,
    replicas: Replicas = None,
    prune_projectors: Annotated[
        bool,
        typer.Option(
            "--prune-projectors",
            help="Also delete the durable of a projector partition the count dropped while it still has events not folded "
            "(`streamsched replay rebuild-state` folds them afterwards).",
        ),
    ] = False,
) -> None:
    """Create or update every stream, consumer and KV bucket in place (a new priority gets its tasks.submit.<priority>); prints what changed.

    Two things are deleted. KV workers or regions on another storage than their
    definition's is made again (JetStream cannot change it in place; their entries are
    heartbeats, put again within one). The projector durables of another
    STREAMSCHED_PROJECTOR_PARTITIONS give way to this count's, which start where the
    slowest of them stands; a dropped partition's durable with events not folded yet is
    kept (the line says "kept") until its projector has folded them."""
    settings = _settings(regions, replicas)

    async def go() -> None:
        bus = await Bus.connect(settings.nats_url, name="streamsched-cli")
        try:
            for change in await streams.apply(bus, settings, prune_projectors=prune_projectors):
                typer.echo(str(change))
        except nats.js.errors.APIError as exc:
            # A server's refusal is the deployment's to fix (its storage limits, say): one line, no traceback.
            hint = " (docs/OPERATIONS.md, Sizing)" if exc.err_code == INSUFFICIENT_RESOURCES else ""
            typer.echo(f"error: JetStream refused a definition: {explain(exc)}{hint}", err=True)
            raise typer.Exit(1) from None
        finally:
            await bus.close()

    anyio.run(go)


@streams_app.command("show")
def show() -> None:
    """Print every stream with its depth per subject, and its consumers."""
    settings = load_or_exit()

    async def go() -> None:
        bus = await Bus.connect(settings.nats_url, name="streamsched-cli")
        try:
            for line in await streams.show(bus):
                typer.echo(line)
        finally:
            await bus.close()

    anyio.run(go)


@streams_app.command("render")
def render(
    format: Annotated[
        Format,
        typer.Option("--format", help="nack: Kubernetes resources for NACK (YAML); json: the API shapes streams apply sends."),
    ] = Format.NACK,
    regions: Regions = None,
    replicas: Replicas = None,
    namespace: Annotated[str | None, typer.Option(help="The resources' namespace [default: none, kubectl's current one].")] = None,
    types: Annotated[
        str | None,
        typer.Option(help="Comma-separated task types whose WORK durables to add, per region and priority (workers make them at start otherwise)."),
    ] = None,
) -> None:
    """Print the definitions with the settings filled in, without connecting to NATS."""
    from . import nack

    settings = _settings(regions, replicas)
    task_types = [name.strip() for name in types.split(",") if name.strip()] if types else []
    if format is Format.NACK:
        typer.echo(nack.render(settings, namespace=namespace, task_types=task_types), nl=False)
        return
    filled = streams.filled(settings)
    work = [streams.filled_work_consumer(settings, r, p, t) for r in settings.regions for p in settings.priorities for t in task_types]
    typer.echo(json.dumps({"streams": filled.streams, "kv": filled.kv, "consumers": filled.consumers + work}, indent=2))
