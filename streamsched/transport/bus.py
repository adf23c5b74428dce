"""The thin adapter over nats-py: connect, bounded async publish, raw API, ack protocol.

:meth:`Bus.publish` returns a future that always completes: nats-py's async publish
futures never resolve if the PubAck is lost in a reconnect, so a sweeper fails them after
``publish_timeout_s`` and the caller retries (same ``Nats-Msg-Id``, so no copy). The
consuming side is :mod:`streamsched.transport.pull` (continuous priority pull) and
:mod:`streamsched.roles.settle` (acks after publishes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import msgspec
import nats
import nats.js.errors
from nats.aio.client import Client

from ..errors import Unavailable
from . import wire
from .credentials import CredentialsError, connect_options

log = logging.getLogger("streamsched.bus")

#: Tries of a command's first connection (``reconnect_time_wait`` apart) before it gives up.
FIRST_CONNECT_ATTEMPTS = 10
#: Pauses before publishing again what failed, before giving up (and nak'ing upstream).
REPUBLISH_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0)


def explain(error: BaseException | None) -> str:
    """``error`` for a message or log line: a JetStream error with its code and description
    (``ServiceUnavailableError 10077: maximum bytes exceeded``), which its repr leaves out."""
    if isinstance(error, nats.js.errors.APIError):
        return f"{type(error).__name__} {error.err_code}: {error.description}"
    return repr(error)


class PublishLost(ConnectionError):
    """The connection dropped while a publish waited for its PubAck."""


class Landing:
    """Waits for the PubAcks of a group of publishes without a future per publish:
    ``callback(first_error_or_None)`` runs once, as the last of them lands."""

    __slots__ = ("callback", "error", "remaining")

    def __init__(self, callback: Callable[[BaseException | None], None], remaining: int) -> None:
        self.callback = callback
        self.remaining = remaining
        self.error: BaseException | None = None

    def landed(self, error: BaseException | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.remaining -= 1
        if self.remaining == 0:
            self.callback(self.error)


class Pending(Protocol):
    """Something a hop waits for besides its publishes (an events message on its way)."""

    def then(self, callback: Callable[[BaseException | None], None]) -> None: ...


class Gathering:
    """The PubAcks of a group of publishes, each kept by its index (a dict, or the error),
    with one future for the group, set once all are in: a future per publish, and
    ``asyncio.wait`` over them, cost a scheduled callback each."""

    __slots__ = ("done", "remaining", "results")

    def __init__(self, count: int) -> None:
        self.results: list[dict[str, Any] | BaseException | None] = [None] * count
        self.remaining = count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not count:
            self.done.set_result(None)

    def answered(self, index: int, result: dict[str, Any] | BaseException) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


#: What waits for a PubAck: the caller's future, its group's landing, or its place in a gathering.
Waiter = asyncio.Future[dict[str, Any]] | Landing | tuple[Gathering, int]


def _resolve(waiter: Waiter, outcome: dict[str, Any] | BaseException) -> None:
    """Hand a PubAck (a dict) or an error to whatever waits for it."""
    if type(waiter) is Landing:
        waiter.landed(outcome if isinstance(outcome, BaseException) else None)
    elif type(waiter) is tuple:
        gathering, index = waiter
        gathering.answered(index, outcome)
    elif isinstance(waiter, asyncio.Future) and not waiter.done():
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


class Bus:
    """One NATS connection with its JetStream context, shared by the roles of a process."""

    def __init__(
        self,
        nc: Client,
        *,
        api_timeout_s: float = 10.0,
        publish_timeout_s: float = 10.0,
        max_in_flight: int = 20_000,
    ) -> None:
        self.nc = nc
        # The connection's publish, chosen once: the fast path or nats-py's own (see wire).
        self._send = wire.install(nc).send
        self.js = nc.jetstream(timeout=api_timeout_s)
        self.api_timeout_s = api_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.max_in_flight = max_in_flight
        self._acks: dict[int, Waiter] = {}
        self._deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self._reply_prefix = ""
        self._next_token = 0
        self._room = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._on_reconnect: list[Callable[[], None]] = []
        self._answers_prefix = ""
        self._answers_started: asyncio.Task[Any] | None = None
        self._answer_handlers: dict[str, wire.Handler] = {}
        self._next_answer = 0

    @classmethod
    async def connect(cls, url: str, *, name: str, wait_for_server: bool = False, environ: Mapping[str, str] | None = None) -> Bus:
        """Connect; once connected, reconnects never give up.

        A role (``wait_for_server``) waits for a server that is not up yet, as a service
        started before its broker should. A command gives up after
        :data:`FIRST_CONNECT_ATTEMPTS` with :class:`~streamsched.errors.Unavailable`.
        Credentials and TLS come from ``environ`` (the process's environment by default; see
        :mod:`streamsched.transport.credentials`).
        """
        holder: list[Bus] = []

        async def reconnected() -> None:
            where = holder[0].nc.connected_url if holder else None
            log.warning("reconnected to %s", where.netloc if where else url)
            for callback in list(holder[0]._on_reconnect) if holder else ():
                callback()

        async def disconnected() -> None:
            if holder and not holder[0].nc.is_closed:
                log.warning("disconnected from NATS; reconnecting")
                holder[0]._fail_in_flight()

        # nats-py tries a failing TLS handshake again for ever, whatever its attempts limit:
        # a command gives up once each server listed could have failed one (it tries them in
        # turn), since no retry can fix a certificate.
        tls_failed: asyncio.Future[ssl.SSLError] = asyncio.get_running_loop().create_future()
        tls_failures = 0
        servers = len(url.split(","))

        async def error(exc: Exception) -> None:
            # A refused credential or subject, or a certificate, is the deployment's to fix: say so where it shows.
            nonlocal tls_failures
            if isinstance(exc, ssl.SSLError) and not wait_for_server and not tls_failed.done():
                tls_failures += 1
                if tls_failures >= servers:
                    tls_failed.set_result(exc)  # raised as Unavailable below, with what to do
                return
            refused = isinstance(exc, ssl.SSLError) or any(
                word in str(exc).lower() for word in ("permissions violation", "authorization", "authentication")
            )
            log.log(logging.ERROR if refused else logging.DEBUG, "nats client error: %s", exc if refused else repr(exc))

        if wait_for_server:
            log.info("connecting to NATS at %s (waiting for it if it is not up yet)", url)
        try:
            credentials = connect_options(environ)
        except CredentialsError as exc:
            raise Unavailable(f"cannot connect to NATS: {exc}") from None
        connecting = asyncio.ensure_future(
            nats.connect(
                url.split(","),
                **credentials,
                name=name,
                # nats-py counts the first connection's tries against the reconnect limit:
                # bounded for a command, then unbounded once connected (below).
                max_reconnect_attempts=-1 if wait_for_server else FIRST_CONNECT_ATTEMPTS,
                reconnect_time_wait=0.2,
                connect_timeout=5,
                reconnected_cb=reconnected,
                disconnected_cb=disconnected,
                error_cb=error,
            )
        )
        await asyncio.wait((connecting, tls_failed), return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            raise Unavailable(
                f"cannot connect to NATS at {url}: TLS failed ({tls_failed.result()}); the server's certificate must be "
                "signed by the CA in NATS_CA, and a server that verifies clients needs NATS_CERT and NATS_KEY"
            )
        tls_failed.cancel()
        try:
            nc = connecting.result()
        except (nats.errors.NoServersError, OSError) as exc:
            raise Unavailable(f"cannot reach NATS at {url} ({exc or type(exc).__name__}); is the server up? (NATS_URL)") from None
        nc.options["max_reconnect_attempts"] = -1
        bus = cls(nc)
        holder.append(bus)
        await bus.start()
        return bus

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every reconnect (pull requests do not survive one)."""
        self._on_reconnect.append(callback)

    def send(self, subject: str, data: bytes, reply: str = "", headers: dict[str, str] | None = None) -> None:
        """Core publish, buffered and not awaited (acks, pull requests): :func:`streamsched.transport.wire.send`."""
        self._send(self.nc, subject, data, reply, headers)

    async def subscribe(self, subject: str, handler: wire.Handler) -> Any:
        """A subscription whose messages go straight to ``handler`` (see :mod:`streamsched.transport.wire`)."""
        return await wire.subscribe(self.nc, subject, handler)

    @contextlib.asynccontextmanager
    async def reply_subject(self, handler: wire.Handler) -> AsyncIterator[str]:
        """A reply subject whose messages go to ``handler`` while the block runs (the answers
        to a request of many replies, such as a batched direct get). One wildcard
        subscription serves every such request of the connection: one per request would
        cost a SUB and an UNSUB, each a change to the server's subject table."""
        started = self._answers_started
        if started is None or (started.done() and (started.cancelled() or started.exception() is not None)):  # first, or failed: again
            self._answers_prefix = self.nc.new_inbox() + "."
            started = self._answers_started = asyncio.ensure_future(wire.subscribe(self.nc, self._answers_prefix + "*", self._on_answer))
        await asyncio.shield(started)
        self._next_answer += 1
        token = str(self._next_answer)
        self._answer_handlers[token] = handler
        try:
            yield self._answers_prefix + token
        finally:
            del self._answer_handlers[token]

    def _on_answer(self, subject: str, reply: str, data: bytes, raw_headers: bytes | None) -> None:
        handler = self._answer_handlers.get(subject[len(self._answers_prefix) :])
        if handler is not None:  # None: a late answer to a request that gave up
            handler(subject, reply, data, raw_headers)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | bytes | None = None) -> asyncio.Future[dict[str, Any]]:
        """Publish to JetStream without waiting; the future holds the PubAck (a dict) or an error.

        Our own path rather than ``js.publish_async``: per message that one draws random
        bytes, scans an asyncio semaphore's waiters and builds a dataclass, which
        together cost more than the publish. Bounded by ``max_in_flight``.
        """
        await self._room_to_publish()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._track(subject, data, headers, future, time.monotonic() + self.publish_timeout_s)
        return future

    async def publish_gathered(self, publications: Sequence[tuple[str, bytes, dict[str, str] | bytes | None]]) -> Gathering:
        """Publish ``(subject, body, headers)`` each without waiting; the returned
        :class:`Gathering` holds each PubAck (or error) by index once ``done``.
        Bounded by ``max_in_flight`` like :meth:`publish`."""
        await self._room_to_publish()
        gathering = Gathering(len(publications))
        deadline = time.monotonic() + self.publish_timeout_s
        for index, (subject, data, headers) in enumerate(publications):
            try:
                self._track(subject, data, headers, (gathering, index), deadline)
            except Exception as exc:  # noqa: BLE001 - not connected: this one failed
                gathering.answered(index, exc)
        return gathering

    def publish_all(
        self,
        publications: Sequence[tuple[str, bytes, dict[str, str] | bytes | None]],
        callback: Callable[[BaseException | None], None],
        also: Sequence[Pending] = (),
    ) -> None:
        """Publish ``(subject, body, headers)`` each without waiting, and call
        ``callback(first_error_or_None)`` once all of them (and what ``also`` names) landed.

        What :meth:`publish` does, for a hop's whole output at once and with one counter
        instead of a future per publish: futures cost a scheduled callback each. It does
        not wait, so it can run in the read loop: the caller bounds what is in flight
        (a hop publishes for the messages it holds, at most its puller's capacity), and
        :meth:`start` must have run (:meth:`connect` runs it).
        """
        if not self._reply_prefix:
            raise RuntimeError("Bus.start() has not run: no inbox for PubAcks yet")
        # One count more than there are waits: released last, so that a publish failing
        # right here cannot complete the landing before the others are sent.
        landing = Landing(callback, len(publications) + len(also) + 1)
        deadline = time.monotonic() + self.publish_timeout_s
        for subject, data, headers in publications:
            try:
                self._track(subject, data, headers, landing, deadline)
            except Exception as exc:  # noqa: BLE001 - not connected: the callback retries
                landing.landed(exc)
        for pending in also:
            pending.then(landing.landed)
        landing.landed(None)

    async def publish_many(
        self,
        publications: Iterable[tuple[str, bytes, dict[str, str] | bytes | None]],
        *,
        window: int = 4000,
        chunk: int = 100,
        unstored: list[tuple[str, bytes, dict[str, str] | bytes | None]] | None = None,
    ) -> tuple[int, BaseException | None]:
        """Publish ``(subject, body, headers)`` each, with at most ``window`` awaiting their
        PubAck; returns ``(publishes that failed, first error)`` once all landed.

        For a burst: the publishes of each ``chunk`` share one landing (:meth:`publish_all`),
        so a publish costs no future, and the loop gets a turn after each chunk so that
        writes go out as they are made. A failed publish fails its whole chunk: publishing
        it again is safe where each message carries a ``Nats-Msg-Id``. The publications
        of failed chunks are appended to ``unstored`` when it is given, to be sent again.
        """
        failed = 0
        first: BaseException | None = None
        in_flight = 0
        room = asyncio.Event()

        def landing(batch: list[tuple[str, bytes, dict[str, str] | bytes | None]]) -> Callable[[BaseException | None], None]:
            def landed(error: BaseException | None) -> None:
                nonlocal in_flight, failed, first
                in_flight -= len(batch)
                if error is not None:
                    failed += len(batch)
                    first = first or error
                    if unstored is not None:
                        unstored.extend(batch)
                room.set()

            return landed

        async def send(batch: list[tuple[str, bytes, dict[str, str] | bytes | None]]) -> None:
            nonlocal in_flight
            while in_flight and in_flight + len(batch) > window:
                room.clear()
                await room.wait()
            in_flight += len(batch)
            self.publish_all(batch, landing(batch))
            await asyncio.sleep(0)

        batch: list[tuple[str, bytes, dict[str, str] | bytes | None]] = []
        for publication in publications:
            batch.append(publication)
            if len(batch) >= chunk:
                await send(batch)
                batch = []
        if batch:
            await send(batch)
        while in_flight:
            room.clear()
            await room.wait()
        return failed, first

    def _track(self, subject: str, data: bytes, headers: dict[str, str] | bytes | None, waiter: Waiter, deadline: float) -> None:
        """Send one publish whose PubAck goes to ``waiter`` (failed by the sweeper after
        ``deadline``); raises, tracking nothing, if it could not be sent."""
        self._next_token += 1
        token = self._next_token
        self._send(self.nc, subject, data, self._reply_prefix + str(token), headers)
        self._acks[token] = waiter
        self._deadlines.append((deadline, token))

    async def start(self) -> None:
        """Subscribe to this connection's PubAck inbox (idempotent; :meth:`connect` does it)."""
        if not self._reply_prefix:
            await self._start_acks()

    async def _room_to_publish(self) -> None:
        """Wait until fewer than ``max_in_flight`` publishes await their PubAck."""
        await self.start()
        while len(self._acks) >= self.max_in_flight:
            self._room.clear()
            await self._room.wait()

    async def _start_acks(self) -> None:
        self._reply_prefix = self.nc.new_inbox() + "."
        await wire.subscribe(self.nc, self._reply_prefix + "*", self._on_ack)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def _on_ack(self, subject: str, _reply: str, data: bytes, raw_headers: bytes | None) -> None:
        try:
            token = int(subject[len(self._reply_prefix) :])
        except ValueError:
            return
        waiter = self._acks.pop(token, None)
        if len(self._acks) < self.max_in_flight:
            self._room.set()
        if waiter is None:
            return
        if type(waiter) is Landing and not raw_headers and b'"error"' not in data:
            waiter.landed(None)  # a landing needs no PubAck fields: not decoded
            return
        if raw_headers and wire.parse_headers(raw_headers).get("Status") == "503":
            _resolve(waiter, nats.js.errors.NoStreamResponseError())
            return
        try:
            response = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            _resolve(waiter, exc)
            return
        if "error" in response:
            try:
                raise nats.js.errors.APIError.from_error(response["error"])
            except nats.js.errors.APIError as exc:
                _resolve(waiter, exc)
            return
        _resolve(waiter, response)

    def _fail_in_flight(self) -> None:
        """PubAcks of publishes in flight are lost with the connection: fail them now, so
        callers publish again after the reconnect instead of waiting ``publish_timeout_s``.
        (A publish that did land is stored once anyway: the retry carries the same msg id.)"""
        acks, self._acks = self._acks, {}
        for waiter in acks.values():
            _resolve(waiter, PublishLost("connection lost before the PubAck arrived"))
        self._room.set()

    async def _sweep(self) -> None:
        """Fail publishes whose PubAck never came (lost in a reconnect), so callers retry."""
        deadlines = self._deadlines
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            while deadlines and (deadlines[0][1] not in self._acks or deadlines[0][0] < now):
                _, token = deadlines.popleft()
                waiter = self._acks.pop(token, None)
                if waiter is not None:
                    _resolve(waiter, nats.errors.TimeoutError())
            self._room.set()

    async def close(self) -> None:
        """Flush what is buffered and close; idempotent."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()


def stored_at_ns(reply: str) -> int:
    """The time the server stored the message, from its ack subject (nanoseconds)."""
    tokens = reply.split(".")
    return int(tokens[7] if len(tokens) == 9 else tokens[9])


#: Ack-protocol bodies (what ``Msg.ack()`` and friends send), used directly so that acks
#: can be batched and a term can carry its reason.
ACK = b"+ACK"


def nak_with_delay(delay_s: float) -> bytes:
    return b'-NAK {"delay":%d}' % int(delay_s * 1e9)


def term_with_reason(reason: str) -> bytes:
    return b"+TERM " + reason.encode()[:512]
