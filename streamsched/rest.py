"""The REST API (``streamsched api``, and ``streamsched up`` on port 8080): a thin Litestar
layer over :class:`~streamsched.client.Client`, so a task sent over HTTP is checked, stored
and reported exactly as one sent from Python. The same process serves the NATS service
API (:mod:`streamsched.nats_api`) on the client's connection.

Errors are JSON ``{"error": ..., "field": ...}``: 422 for an invalid submission (naming the
field when the reason does), 404 for an unknown id, 409 for a task that finished already,
429 when a stream is full (with ``Retry-After``), 503 with ``Retry-After`` while NATS cannot
be reached, 413 for a body over ``max_payload_bytes`` (refused before it is read whole).
The OpenAPI document is at ``/openapi.json``; ``/health`` is liveness, ``/ready`` checks
NATS and the streams.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats.errors
from litestar import Litestar, Request, Response, get, post
from litestar.config.app import AppConfig
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from prometheus_client import CONTENT_TYPE_LATEST

from . import dashboard, nats_api, subjects
from .client import Client
from .config import Settings
from .errors import AlreadyFinished, NotFound, Overloaded, Rejected, Unavailable
from .eventlog import events as ev
from .eventlog import reader as eventlog
from .metrics import ClusterMetrics
from .model import Status, Submission, TaskState
from .roles.worker_registry import WorkerInfo
from .roles.workflows import WorkflowState
from .task_index import Filter, Page, TaskIndex
from .transport.reading import Since

log = logging.getLogger("streamsched.api")

#: Seconds a client is asked to wait before trying again (503, 429).
RETRY_AFTER_S = 1
#: Longest a request waits for NATS before it is answered 503.
NATS_TIMEOUT_S = 5.0


class SubmitResult(msgspec.Struct, frozen=True):
    """What ``POST /api/v1/tasks`` stored: the task ids (for a workflow, its id)."""

    ids: list[str]


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """Every error answer: ``error`` the reason, ``field`` the field it names; ``status_code``
    and ``detail`` (the reason again) as Litestar documents its own error answers."""

    status_code: int
    detail: str
    error: str
    field: str | None = None


class Priority(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /api/v1/tasks/{id}/priority``: the new priority."""

    priority: str


class CancelRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /api/v1/tasks/{id}/cancel``: why (optional)."""

    reason: str = ""


def _client(request: Request[Any, Any, Any]) -> Client:
    client: Client = request.app.state.client
    return client


def _json(value: Any, status_code: int = 200) -> Response[Any]:
    """``value`` encoded by msgspec (states hold raw JSON results, which it writes as they are)."""
    return Response(msgspec.json.encode(value), status_code=status_code, media_type="application/json")


@post("/api/v1/tasks", status_code=201, summary="Submit one task, a batch or a workflow", request_max_body_size=None)
async def submit(request: Request[Any, Any, Any]) -> SubmitResult:
    """The body is what a publisher sends to ``tasks.submit``: a task's JSON (``{"type": ..., "payload": ...}``),
    ``{"batch": [task, ...]}`` (all or nothing) or ``{"workflow": {"id": ..., "tasks": [...]}}``."""
    client = _client(request)
    limit = client.settings.max_payload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status_code=413, detail=f"the body is {declared} bytes, over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(status_code=413, detail=f"the body is over the limit of {limit} bytes")
    return SubmitResult(await client.submit_message(bytes(body)))


def _index(request: Request[Any, Any, Any]) -> TaskIndex:
    index: TaskIndex = request.app.state.index
    return index


def _filter(
    status: str | None, task_type: str | None, region: str | None, labels: list[str] | None, since: float | None, until: float | None
) -> Filter:
    try:
        wanted = Status(status) if status is not None else None
    except ValueError:
        raise Rejected(f"unknown status {status!r} (expected one of {', '.join(s.value for s in Status)})", field="status") from None
    pairs = {}
    for label in labels or ():
        name, sep, value = label.partition("=")
        if not sep:
            raise Rejected(f"label {label!r} is not name=value", field="label")
        pairs[name] = value
    return Filter(status=wanted, type=task_type, region=region, labels=pairs, since=since, until=until)


async def _page(request: Request[Any, Any, Any], where: Filter, limit: int, cursor: str | None) -> Page:
    return await _index(request).loaded_page(where, limit=limit, cursor=cursor)


@get("/api/v1/tasks", summary="Tasks, newest submission first, filtered, a page at a time")
async def list_tasks(
    request: Request[Any, Any, Any],
    status: FromQuery[str | None] = None,
    type: FromQuery[str | None] = None,
    region: FromQuery[str | None] = None,
    label: FromQuery[list[str] | None] = None,
    since: FromQuery[float | None] = None,
    until: FromQuery[float | None] = None,
    limit: FromQuery[int] = 50,
    cursor: FromQuery[str | None] = None,
) -> Page:
    """``label`` is ``name=value`` (repeatable: all must match); ``since``/``until`` are Unix
    seconds of submission; ``cursor`` is the ``next_cursor`` of the page before."""
    return await _page(request, _filter(status, type, region, label, since, until), limit, cursor)


@get("/api/v1/tasks/status/{status:str}", summary="Tasks of one status, newest submission first")
async def list_by_status(
    request: Request[Any, Any, Any], status: FromPath[str], limit: FromQuery[int] = 50, cursor: FromQuery[str | None] = None
) -> Page:
    return await _page(request, _filter(status, None, None, None, None, None), limit, cursor)


@get("/metrics", summary="Prometheus metrics of the whole cluster (see streamsched.metrics)", media_type="text/plain; version=0.0.4")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    cluster: ClusterMetrics = request.app.state.metrics
    return Response(await cluster.render(), media_type=CONTENT_TYPE_LATEST)


@get("/api/v1/tasks/{task_id:str}", summary="A task's state")
async def get_task(request: Request[Any, Any, Any], task_id: FromPath[str]) -> Response[Any]:
    state = await _client(request).get(task_id)
    if state is None:
        raise NotFound(f"no task {task_id}")
    return _json(state)


@get("/api/v1/tasks/{task_id:str}/events", summary="A task's events, in order")
async def task_events(request: Request[Any, Any, Any], task_id: FromPath[str]) -> Response[Any]:
    events = await _client(request).history(task_id)
    if not events:
        raise NotFound(f"no events for task {task_id}")
    return _json(events)


@post("/api/v1/tasks/{task_id:str}/cancel", status_code=202, summary="Cancel a task (or a workflow)")
async def cancel(request: Request[Any, Any, Any], task_id: FromPath[str], data: JSONBody[CancelRequest | None] = None) -> Response[Any]:
    state = await _client(request).cancel(task_id, reason=data.reason if data else "")
    return _json(state, 202)


@post("/api/v1/tasks/{task_id:str}/priority", status_code=202, summary="Change a waiting task's priority")
async def reprioritize(request: Request[Any, Any, Any], task_id: FromPath[str], data: JSONBody[Priority]) -> Response[Any]:
    client = _client(request)
    if data.priority not in client.settings.priorities:
        raise Rejected(f"unknown priority {data.priority!r} (expected one of {', '.join(client.settings.priorities)})")
    return _json(await client.reprioritize(task_id, data.priority), 202)


@get("/api/v1/workflows/{workflow_id:str}", summary="A workflow's state")
async def get_workflow(request: Request[Any, Any, Any], workflow_id: FromPath[str]) -> Response[Any]:
    state = await _client(request).get_workflow(workflow_id)
    if state is None:
        raise NotFound(f"no workflow {workflow_id}")
    return _json(state)


@get("/api/v1/workers", summary="The live workers")
async def workers(request: Request[Any, Any, Any]) -> Response[Any]:
    return _json(await _client(request).workers())


@get("/api/v1/cluster/info", summary="The server, the settings the API runs with, and the streams")
async def cluster_info(request: Request[Any, Any, Any]) -> Response[Any]:
    return _json(await _client(request).cluster_info())


@get("/api/v1/cluster/stats", summary="Tasks queued per stream, live workers and regional schedulers")
async def cluster_stats(request: Request[Any, Any, Any]) -> Response[Any]:
    return _json(await _client(request).cluster_stats())


@get("/api/v1/events", summary="A live feed of events (Server-Sent Events), from now on")
async def event_feed(
    request: Request[Any, Any, Any],
    task: FromQuery[str | None] = None,
    type: FromQuery[str | None] = None,
    kind: FromQuery[str | None] = None,
) -> ServerSentEvent:
    """Each event as it is stored, in stream order: ``event:`` its kind, ``id:`` its EVENTS
    sequence, ``data:`` its JSON. Filters: a task id, a task type, an event kind."""
    if kind is not None and kind not in ev.KINDS:
        raise Rejected(f"unknown kind {kind!r} (expected one of {', '.join(sorted(ev.KINDS))})", field="kind")
    client = _client(request)
    since = Since(time=datetime.now(UTC))

    async def feed() -> AsyncIterator[ServerSentEventMessage]:
        async for record in eventlog.tail(client.bus, task_id=task, kind=kind, task_type=type, since=since, follow=True):
            yield ServerSentEventMessage(data=msgspec.json.encode(record.event).decode(), event=record.kind, id=record.seq)

    return ServerSentEvent(feed())


class DeadTaskView(msgspec.Struct, frozen=True):
    """A DLQ entry: the task's last error and its submission as it was run."""

    seq: int
    stored_at: float
    task_id: str
    type: str
    attempts: int
    error: str
    submission: str
    redrive_id: str
    """The id a re-drive submits it again under."""


class RedriveRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``POST /api/v1/dlq/redrive``: the dead tasks of ``type``, or ``all`` of them."""

    type: str | None = None
    all: bool = False
    dry_run: bool = False


class RedriveResult(msgspec.Struct, frozen=True):
    redriven: list[str]
    already_redriven: list[str]
    unreadable: list[str]


@get("/api/v1/dlq", summary="Dead tasks, oldest first")
async def dead_tasks(request: Request[Any, Any, Any], type: FromQuery[str | None] = None, limit: FromQuery[int] = 100) -> list[DeadTaskView]:
    entries = await _client(request).dead_tasks(task_type=type, limit=max(1, min(limit, 1000)))
    return [DeadTaskView(e.seq, e.stored_at, e.task_id, e.type, e.attempts, e.error, e.body.decode(errors="replace"), e.redrive_id) for e in entries]


@post("/api/v1/dlq/redrive", status_code=200, summary="Submit dead tasks again as new tasks (id <id>-r<seq>); safe to repeat")
async def redrive(request: Request[Any, Any, Any], data: JSONBody[RedriveRequest]) -> RedriveResult:
    if data.type is None and not data.all:
        raise Rejected("name the dead tasks' `type`, or set `all`", field="type")
    report = await _client(request).redrive(task_type=data.type, dry_run=data.dry_run)
    return RedriveResult(report.redriven, report.already_redriven, report.unreadable)


class WorkflowBody(msgspec.Struct, frozen=True):
    """A workflow: its tasks, each naming the ones it waits on in ``depends_on``."""

    id: str
    tasks: list[Submission]


class BatchSubmission(msgspec.Struct, frozen=True, omit_defaults=True):
    """Many tasks accepted together or not at all."""

    batch: list[Submission]
    id: str | None = None


class WorkflowSubmission(msgspec.Struct, frozen=True):
    workflow: WorkflowBody


#: The bodies and answers the handlers read and write as raw JSON (so that a submission is
#: checked by the master's own checks, and a state is written as stored), described in the
#: OpenAPI document by the msgspec types that hold them: (method, path) -> (the body's types,
#: one of which it is; the answer's status and type).
RAW_JSON_TYPES: dict[tuple[str, str], tuple[tuple[Any, ...], tuple[str, Any]]] = {
    ("post", "/api/v1/tasks"): ((Submission, BatchSubmission, WorkflowSubmission), ("201", SubmitResult)),
    ("get", "/api/v1/tasks/{task_id}"): ((), ("200", TaskState)),
    ("get", "/api/v1/tasks/{task_id}/events"): ((), ("200", list[ev.AnyEvent])),
    ("post", "/api/v1/tasks/{task_id}/cancel"): ((), ("202", TaskState)),
    ("post", "/api/v1/tasks/{task_id}/priority"): ((), ("202", TaskState)),
    ("get", "/api/v1/workflows/{workflow_id}"): ((), ("200", WorkflowState)),
    ("get", "/api/v1/workers"): ((), ("200", list[WorkerInfo])),
}


def openapi_document_of(app: Litestar) -> dict[str, Any]:
    """Litestar's document, with the raw JSON bodies and answers described by their types."""
    document: dict[str, Any] = app.openapi_schema.to_schema()
    types = [t for bodies, (_, answer) in RAW_JSON_TYPES.values() for t in (*bodies, answer)]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    found = iter(schemas)
    for (method, path), (bodies, (status, _)) in RAW_JSON_TYPES.items():
        operation = document["paths"][path][method]
        if bodies:
            one_of = [next(found) for _ in bodies]
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": {"oneOf": one_of}}}}
        operation["responses"][status]["content"] = {"application/json": {"schema": next(found)}}
    for name, schema in components.items():
        document.setdefault("components", {}).setdefault("schemas", {}).setdefault(name, schema)
    return document


@get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request[Any, Any, Any]) -> dict[str, Any]:
    state = request.app.state
    if "openapi" not in state:
        state.openapi = openapi_document_of(request.app)
    document: dict[str, Any] = state.openapi
    return document


@get("/health", summary="Liveness: the API process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="Readiness: NATS answers and the streams exist")
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    client = _client(request)
    try:
        async with asyncio.timeout(2.0):
            await client.bus.js.stream_info(subjects.TASKS_STREAM)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the answer is "not ready" and why
        return Response(
            msgspec.json.encode(ErrorBody(status_code=503, detail=f"not ready: {exc!r}", error=f"not ready: {exc!r}")),
            status_code=503,
            media_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return _json({"status": "ready"})


def _error(status_code: int, error: str, field: str | None = None, *, retry: bool = False) -> Response[bytes]:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    body = ErrorBody(status_code=status_code, detail=error, error=error, field=field)
    return Response(msgspec.json.encode(body), status_code=status_code, media_type="application/json", headers=headers)


def _on_rejected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, Rejected)
    return _error(422, str(exc), exc.field)


def _on_not_found(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return _error(404, str(exc))


def _on_finished(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return _error(409, str(exc))


def _on_overloaded(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    return _error(429, str(exc), retry=True)


def _on_unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if isinstance(exc, Unavailable):  # says why itself (NATS down, the task list loading)
        return _error(503, str(exc), retry=True)
    log.warning("NATS unavailable: %r", exc)
    return _error(503, f"NATS is not reachable now: {exc}", retry=True)


def _on_http(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    assert isinstance(exc, HTTPException)
    field = None
    if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict):  # Litestar's validation errors name the key
        field = exc.extra[0].get("key")
    return _error(exc.status_code, str(exc.detail), field, retry=exc.status_code == 503)


async def _while_disconnected(request: Request[Any, Any, Any]) -> Response[bytes] | None:
    """Answer 503 at once while the connection to NATS is down (it reconnects by itself),
    rather than let the request wait for a timeout; liveness answers all the same."""
    if request.url.path == "/health" or request.app.state.client.bus.nc.is_connected:
        return None
    return _error(503, "NATS is not reachable now; the API reconnects by itself", retry=True)


#: Paths open without the token: liveness and readiness must answer a probe that has none
#: (they tell only whether the process and NATS answer). (Routes with
#: ``opt={"no_token": True}``, the dashboard's page and files, are open too.)
OPEN_PATHS = frozenset({"/health", "/ready"})


def _token_guard(token: str) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    expected = f"Bearer {token}".encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if connection.url.path in OPEN_PATHS or handler.opt.get("no_token"):
            return
        given = connection.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise NotAuthorizedException(detail="a bearer token is required (Authorization: Bearer <api_token>)")

    return guard


def create_app(settings: Settings, client: Client | None = None, *, nats_service: bool = True) -> Litestar:
    """The ASGI app. Without ``client`` it connects one at startup (and closes it at shutdown).
    With ``nats_service`` it also serves the NATS service API on that client's connection
    (:mod:`streamsched.nats_api`)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        own = client is None
        app.state.client = client if client is not None else await Client.connect(settings.nats_url, name="streamsched-api", settings=settings)
        app.state.index = TaskIndex(app.state.client.bus, max_tasks=settings.api_index_max_tasks)
        await app.state.index.start()
        app.state.metrics = ClusterMetrics.start(app.state.client, app.state.index)
        service = await nats_api.start(app.state.client, app.state.index) if nats_service else None
        try:
            yield
        finally:
            if service is not None:
                await service.stop()
            await app.state.metrics.stop()
            await app.state.index.stop()
            if own:
                await app.state.client.close()

    def configure(config: AppConfig) -> AppConfig:
        config.request_max_body_size = settings.max_payload_bytes * 4 + 4096
        return config

    return Litestar(
        route_handlers=[
            submit,
            list_tasks,
            list_by_status,
            event_feed,
            dead_tasks,
            redrive,
            metrics,
            get_task,
            task_events,
            cancel,
            reprioritize,
            get_workflow,
            workers,
            cluster_info,
            cluster_stats,
            openapi_document,
            health,
            ready,
            *dashboard.ROUTES,
        ],
        lifespan=[lifespan],
        on_app_init=[configure],
        exception_handlers={
            Rejected: _on_rejected,
            NotFound: _on_not_found,
            AlreadyFinished: _on_finished,
            Overloaded: _on_overloaded,
            Unavailable: _on_unavailable,
            nats.errors.TimeoutError: _on_unavailable,
            nats.errors.NoServersError: _on_unavailable,
            nats.errors.ConnectionClosedError: _on_unavailable,
            HTTPException: _on_http,
        },
        openapi_config=OpenAPIConfig(title="streamsched", version="1", path="/docs", render_plugins=[ScalarRenderPlugin()]),
        guards=[_token_guard(settings.api_token)] if settings.api_token else [],
        before_request=_while_disconnected,
        debug=False,
    )
