"""The NATS service API: the REST API's operations as a NATS micro service, so a client in any
language with only a NATS connection needs nothing else.

Request/reply with JSON bodies on ``streamsched.api.<operation>``, discoverable through the
standard ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` subjects (service name
``streamsched``). ``streamsched api`` runs it beside the HTTP server, on the same
:class:`~streamsched.client.Client`; several API processes share the requests (one queue
group).

=================================  ======================================  =========================
subject                            request                                 reply
=================================  ======================================  =========================
``streamsched.api.tasks.submit``   a task's JSON, a batch or a workflow    ``{"ids": [...]}``
``streamsched.api.tasks.get``      ``{"id": ...}``                         the task's state
``streamsched.api.tasks.events``   ``{"id": ...}``                         its events, in order
``streamsched.api.tasks.cancel``   ``{"id": ..., "reason": ...}``          its state when asked
``streamsched.api.tasks.priority`` ``{"id": ..., "priority": ...}``        its state when asked
``streamsched.api.workflows.get``  ``{"id": ...}``                         the workflow's state
``streamsched.api.tasks.list``     filters, ``limit``, ``cursor``          a page of tasks
``streamsched.api.workers.list``   (empty)                                 the live workers
``streamsched.api.dlq.list``       ``{"type": ..., "limit": ...}``         dead tasks, oldest first
``streamsched.api.dlq.redrive``    ``{"type": ... or "all": true}``        the ids submitted again
``streamsched.api.cluster.info``   (empty)                                 server, settings, streams
``streamsched.api.cluster.stats``  (empty)                                 counts per stream, workers
=================================  ======================================  =========================

An error is the micro-service protocol's: headers ``Nats-Service-Error-Code`` (the HTTP code
the REST API would give: 400, 404, 409, 422, 429, 503) and ``Nats-Service-Error`` (the
reason), with the same JSON body as the REST API's (``{"error": ..., "field": ...}``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig

from . import __version__
from .client import Client
from .errors import AlreadyFinished, NotFound, Overloaded, Rejected, Unavailable
from .model import Status
from .task_index import Filter, TaskIndex

log = logging.getLogger("streamsched.api")

SERVICE_NAME = "streamsched"
PREFIX = "streamsched.api"
#: The queue group the API processes share, so a request is answered once.
QUEUE_GROUP = "streamsched-api"


class _Id(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str


class _Cancel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    reason: str = ""


class _Priority(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    priority: str


class _Error(msgspec.Struct, frozen=True, omit_defaults=True):
    error: str
    field: str | None = None


Operation = Callable[[Client, bytes], Awaitable[Any]]


def _decode(data: bytes, shape: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data or b"{}", type=shape)
    except msgspec.ValidationError as exc:
        raise Rejected(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Rejected(f"the request is not JSON: {exc}") from None


async def _submit(client: Client, data: bytes) -> Any:
    return {"ids": await client.submit_message(data)}


async def _get(client: Client, data: bytes) -> Any:
    task_id = _decode(data, _Id).id
    state = await client.get(task_id)
    if state is None:
        raise NotFound(f"no task {task_id}")
    return state


async def _events(client: Client, data: bytes) -> Any:
    task_id = _decode(data, _Id).id
    events = await client.history(task_id)
    if not events:
        raise NotFound(f"no events for task {task_id}")
    return events


async def _cancel(client: Client, data: bytes) -> Any:
    request = _decode(data, _Cancel)
    return await client.cancel(request.id, reason=request.reason)


async def _priority(client: Client, data: bytes) -> Any:
    request = _decode(data, _Priority)
    if request.priority not in client.settings.priorities:
        raise Rejected(f"unknown priority {request.priority!r} (expected one of {', '.join(client.settings.priorities)})")
    return await client.reprioritize(request.id, request.priority)


async def _workflow(client: Client, data: bytes) -> Any:
    workflow_id = _decode(data, _Id).id
    state = await client.get_workflow(workflow_id)
    if state is None:
        raise NotFound(f"no workflow {workflow_id}")
    return state


class _DeadTasks(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    type: str | None = None
    limit: int = 100


class _Redrive(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    type: str | None = None
    all: bool = False
    dry_run: bool = False


async def _dead_tasks(client: Client, data: bytes) -> Any:
    request = _decode(data, _DeadTasks)
    entries = await client.dead_tasks(task_type=request.type, limit=max(1, min(request.limit, 1000)))
    return [{**vars(entry), "body": entry.body.decode(errors="replace")} for entry in entries]


async def _redrive(client: Client, data: bytes) -> Any:
    request = _decode(data, _Redrive)
    if request.type is None and not request.all:
        raise Rejected("name the dead tasks' `type`, or set `all`", field="type")
    return vars(await client.redrive(task_type=request.type, dry_run=request.dry_run))


async def _workers(client: Client, _data: bytes) -> Any:
    return await client.workers()


async def _info(client: Client, _data: bytes) -> Any:
    return await client.cluster_info()


async def _stats(client: Client, _data: bytes) -> Any:
    return await client.cluster_stats()


#: Endpoint name -> (subject under :data:`PREFIX`, operation).
OPERATIONS: dict[str, tuple[str, Operation]] = {
    "tasks-submit": ("tasks.submit", _submit),
    "tasks-get": ("tasks.get", _get),
    "tasks-events": ("tasks.events", _events),
    "tasks-cancel": ("tasks.cancel", _cancel),
    "tasks-priority": ("tasks.priority", _priority),
    "workflows-get": ("workflows.get", _workflow),
    "workers-list": ("workers.list", _workers),
    "dlq-list": ("dlq.list", _dead_tasks),
    "dlq-redrive": ("dlq.redrive", _redrive),
    "cluster-info": ("cluster.info", _info),
    "cluster-stats": ("cluster.stats", _stats),
}


def _status_of(exc: Exception) -> tuple[int, str | None]:
    """The HTTP-like code of an operation's error, and the field it names."""
    if isinstance(exc, Rejected):
        return 422, exc.field
    if isinstance(exc, NotFound):
        return 404, None
    if isinstance(exc, AlreadyFinished):
        return 409, None
    if isinstance(exc, Overloaded):
        return 429, None
    if isinstance(exc, Unavailable | nats.errors.TimeoutError | nats.errors.ConnectionClosedError | nats.errors.NoServersError):
        return 503, None
    return 500, None


def _endpoint(client: Client, operation: Operation) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            answer = await operation(client, request.data)
        except Exception as exc:  # every error is answered (logged when unexpected): none may end the service
            code, field = _status_of(exc)
            if code == 500:
                log.exception("NATS API %s failed", request.subject)
            reason = " ".join(str(exc).split())[:1024] or type(exc).__name__  # a header: one line
            await request.respond_error(str(code), reason, msgspec.json.encode(_Error(reason, field)))
            return
        await request.respond(msgspec.json.encode(answer))

    return handle


class _List(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    status: Status | None = None
    type: str | None = None
    region: str | None = None
    labels: dict[str, str] = {}
    since: float | None = None
    until: float | None = None
    limit: int = 50
    cursor: str | None = None


def _lister(index: TaskIndex) -> Operation:
    async def list_tasks(_client: Client, data: bytes) -> Any:
        request = _decode(data, _List)
        where = Filter(
            status=request.status, type=request.type, region=request.region, labels=request.labels, since=request.since, until=request.until
        )
        return await index.loaded_page(where, limit=request.limit, cursor=request.cursor)

    return list_tasks


async def start(client: Client, index: TaskIndex | None = None) -> Service:
    """Register the service on the client's connection; stop it with ``await service.stop()``."""
    config = ServiceConfig(
        name=SERVICE_NAME,
        version=__version__,
        description="streamsched: submit tasks, read their state, cancel, reprioritize; workers and cluster",
        queue_group=QUEUE_GROUP,
    )
    service = await add_service(client.bus.nc, config)
    group = service.add_group(name=PREFIX)
    operations = dict(OPERATIONS)
    if index is not None:
        operations["tasks-list"] = ("tasks.list", _lister(index))
    for name, (subject, operation) in operations.items():
        await group.add_endpoint(name=name, subject=subject, handler=_endpoint(client, operation))
    return service
