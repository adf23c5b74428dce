"""The gRPC API (``streamsched grpc``): the service ``streamsched.v1.Scheduler`` of
``proto/streamsched/v1/scheduler.proto``, a thin grpc.aio layer over
:class:`~streamsched.client.Client`, so a task sent over gRPC is checked, stored and reported
exactly as one sent over REST (:mod:`streamsched.rest`) or NATS (:mod:`streamsched.nats_api`).

The errors of the service core become status codes, the reason their details: Rejected ->
INVALID_ARGUMENT (trailing metadata ``streamsched-field`` names the field when the reason
does), NotFound -> NOT_FOUND, AlreadyFinished -> FAILED_PRECONDITION, Overloaded ->
RESOURCE_EXHAUSTED, NATS down or timing out -> UNAVAILABLE (at once while the connection is
down, as the REST API's 503). With ``api_token`` set, every call needs the metadata
``authorization: Bearer <token>``, as the REST API (UNAUTHENTICATED without it). Needs the
``grpc`` extra.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Never, TypeVar

import grpc
import msgspec
import nats.errors

from .client import Client
from .config import Settings
from .errors import AlreadyFinished, NotFound, Overloaded, Rejected, Unavailable
from .eventlog import events as ev
from .eventlog import reader as eventlog
from .grpc_gen import scheduler_pb2 as pb
from .grpc_gen import scheduler_pb2_grpc
from .model import Status, TaskState
from .roles.workflows import WorkflowState
from .task_index import Filter, Indexed, TaskIndex
from .transport.reading import Since

log = logging.getLogger("streamsched.grpc")

DEFAULT_PORT = 50051
#: Tasks a List page holds when the request says 0, as the REST API's default.
DEFAULT_LIMIT = 50
#: Trailing metadata that names the field an INVALID_ARGUMENT's reason names.
FIELD_KEY = "streamsched-field"
#: Seconds a stop gives the calls in flight (open Watch feeds are cut then).
STOP_GRACE_S = 5.0

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
T = TypeVar("T")

_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode], ...] = (
    (Rejected, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ((Unavailable, nats.errors.TimeoutError, nats.errors.NoServersError, nats.errors.ConnectionClosedError), grpc.StatusCode.UNAVAILABLE),
)
_ANSWERED = tuple(kind for kinds, _ in _CODES for kind in (kinds if isinstance(kinds, tuple) else (kinds,)))


def status_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a service core error; None for any other exception."""
    return next((code for kinds, code in _CODES if isinstance(exc, kinds)), None)


def _task(state: TaskState | WorkflowState) -> pb.Task:
    if isinstance(state, WorkflowState):
        return pb.Task(id=state.id, status=state.status, state_json=msgspec.json.encode(state).decode())
    return pb.Task(
        id=state.id, status=state.status.value, type=state.type or "", priority=state.priority or "", state_json=msgspec.json.encode(state).decode()
    )


def _summary(entry: Indexed) -> pb.TaskSummary:
    return pb.TaskSummary(
        id=entry.id,
        status=entry.status.value,
        type=entry.type or "",
        priority=entry.priority or "",
        region=entry.region or "",
        labels=entry.labels,
        submitted_at=entry.submitted_at,
        updated_at=entry.updated_at,
    )


def _filter(request: pb.ListRequest) -> Filter:
    try:
        status = Status(request.status) if request.status else None
    except ValueError:
        raise Rejected(f"unknown status {request.status!r} (expected one of {', '.join(s.value for s in Status)})", field="status") from None
    return Filter(
        status=status,
        type=request.type or None,
        region=request.region or None,
        labels=dict(request.labels),
        since=request.since if request.HasField("since") else None,
        until=request.until if request.HasField("until") else None,
    )


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    """Each call is the REST API's operation of the same name, on the same client."""

    def __init__(self, client: Client, index: TaskIndex) -> None:
        self.client = client
        self.index = index

    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.SubmitResponse:
        return await self._answer(context, self._submit, request)

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.Task:
        return await self._answer(context, self._get, request)

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        return await self._answer(context, self._list, request)

    async def Cancel(self, request: pb.CancelRequest, context: Context) -> pb.Task:
        return await self._answer(context, self._cancel, request)

    async def Reprioritize(self, request: pb.ReprioritizeRequest, context: Context) -> pb.Task:
        return await self._answer(context, self._reprioritize, request)

    async def Watch(self, request: pb.WatchRequest, context: Context) -> AsyncIterator[pb.Event]:
        try:
            self._check_connected()
            kind = request.kind or None
            if kind is not None and kind not in ev.KINDS:
                raise Rejected(f"unknown kind {kind!r} (expected one of {', '.join(sorted(ev.KINDS))})", field="kind")
            since = Since(time=datetime.now(UTC))
            await context.send_initial_metadata(())  # the feed has begun: the client may act on it
            feed = eventlog.tail(
                self.client.bus, task_id=request.task_id or None, kind=kind, task_type=request.type or None, since=since, follow=True
            )
            async for record in feed:
                event = record.event
                yield pb.Event(
                    kind=record.kind,
                    task_id=event.task_id,
                    attempt=event.attempt,
                    at=event.at,
                    seq=record.seq,
                    event_json=msgspec.json.encode(event).decode(),
                )
        except _ANSWERED as exc:
            await _abort(context, exc)

    async def _submit(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        return pb.SubmitResponse(ids=await self.client.submit_message(request.submission))

    async def _get(self, request: pb.GetRequest) -> pb.Task:
        state = await self.client.get(request.id)
        if state is None:
            raise NotFound(f"no task {request.id}")
        return _task(state)

    async def _list(self, request: pb.ListRequest) -> pb.ListResponse:
        where = _filter(request)
        page = await self.index.loaded_page(where, limit=request.limit or DEFAULT_LIMIT, cursor=request.cursor or None)
        return pb.ListResponse(tasks=[_summary(entry) for entry in page.tasks], next_cursor=page.next_cursor or "")

    async def _cancel(self, request: pb.CancelRequest) -> pb.Task:
        return _task(await self.client.cancel(request.id, reason=request.reason))

    async def _reprioritize(self, request: pb.ReprioritizeRequest) -> pb.Task:
        priorities = self.client.settings.priorities
        if request.priority not in priorities:
            raise Rejected(f"unknown priority {request.priority!r} (expected one of {', '.join(priorities)})", field="priority")
        return _task(await self.client.reprioritize(request.id, request.priority))

    async def _answer(self, context: Context, operation: Callable[[R], Awaitable[T]], request: R) -> T:
        """``operation``'s answer, or the call ended with the status of the service core's error."""
        try:
            self._check_connected()
            return await operation(request)
        except _ANSWERED as exc:
            await _abort(context, exc)

    def _check_connected(self) -> None:
        if not self.client.bus.nc.is_connected:  # answered at once rather than after a timeout; it reconnects by itself
            raise Unavailable("NATS is not reachable now; the server reconnects by itself")


async def _abort(context: Context, exc: BaseException) -> Never:
    code = status_of(exc)
    assert code is not None
    if code is grpc.StatusCode.UNAVAILABLE:
        log.warning("NATS unavailable: %r", exc)
    field = exc.field if isinstance(exc, Rejected) else None
    metadata = ((FIELD_KEY, field),) if field and field.isascii() and field.isprintable() else ()
    await context.abort(code, " ".join(str(exc).split()) or type(exc).__name__, metadata)


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses a call without ``authorization: Bearer <token>`` before it reaches the service."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        details = handler_call_details
        handler = await continuation(details)
        given = next((str(value) for key, value in details.invocation_metadata or () if key == "authorization"), "")
        if handler is None or hmac.compare_digest(given.encode(), self.expected):
            return handler
        reason = "a bearer token is required (metadata authorization: Bearer <api_token>)"

        async def refuse(_: object, context: Context) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        async def refuse_stream(_: object, context: Context) -> AsyncIterator[None]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            yield  # a generator, as the method it stands for

        kinds = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, **kinds)
        return grpc.unary_unary_rpc_method_handler(refuse, **kinds)


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(client: Client, index: TaskIndex, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> tuple[grpc.aio.Server, int]:
    """Serve on ``host:port`` (0: a free port); returns the server and its port. Stop it
    with ``await server.stop(grace)``. Raises :class:`OSError` when the address cannot be bound."""
    token = client.settings.api_token
    interceptors = [TokenCheck(token)] if token else []
    # A port taken is an error, not a second server sharing it.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerService(client, index), server)
    try:
        bound = server.add_insecure_port(address(host, port))
    except RuntimeError as exc:  # grpc's way to say the port is taken or the host unknown
        await server.stop(None)  # else it is shut down when collected, from a coroutine nobody awaits
        raise OSError(f"cannot listen on {address(host, port)} (the port is in use, or the address is not this machine's): {exc}") from None
    await server.start()
    return server, bound


async def serve(settings: Settings, host: str, port: int) -> None:
    """Run the server until SIGINT or SIGTERM, then stop it within :data:`STOP_GRACE_S`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with await Client.connect(settings.nats_url, name="streamsched-grpc", settings=settings) as client:
        index = TaskIndex(client.bus, max_tasks=settings.api_index_max_tasks)
        await index.start()
        try:
            server, bound = await start(client, index, host, port)
            log.info("gRPC API listening on %s", address(host, bound))
            await stop.wait()
            await server.stop(STOP_GRACE_S)
        finally:
            await index.stop()
