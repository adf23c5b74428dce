"""The per-message path of the NATS protocol, underneath nats-py.

nats-py keeps the connection: connecting, reconnecting (and re-subscribing), pings, the
JetStream API and every subscription that is not on the per-task path. Two things are
taken over, because per message they cost more than the work around them (measured
with ``python -m streamsched.bench.publish_cost``, which runs the same publishes both ways):

* **Publishing.** ``Client.publish`` checks the subject with a regex and encodes the
  headers key by key through another regex and an f-string (about 6 µs). The fast
  ``send`` builds the ``PUB``/``HPUB`` line with one bytes format and appends it to the
  client's write buffer, then wakes its flusher as nats-py would (about 2 µs).
* **Receiving.** nats-py's parser matches regexes on a bytearray that it shrinks after
  each message, parses every header, builds a ``Msg`` dataclass and queues it for a
  task of its own. :class:`FastParser` walks the buffer with an offset and hands the
  messages of subscriptions registered with :func:`subscribe` straight to a plain
  callback; it passes everything else to nats-py unchanged.

Both reach into nats-py's private parts (its write buffer and flusher queue, its
parser's state, regexes and dispatch methods), which is why ``pyproject.toml`` pins
nats-py to the minor version this was checked with. :func:`install` checks their shape
once per connection (:mod:`streamsched.transport.natspy`); if anything is off, that
connection publishes and receives through nats-py's own API instead (``publish`` and
subscription callbacks), with one warning naming what is missing. The environment
variable ``STREAMSCHED_WIRE=nats-py`` picks that route without a warning (CI runs the
pipeline tests once that way). Callers see no difference: :func:`send` stays
synchronous and buffered, :func:`subscribe` hands the same :data:`Handler` the same
arguments. The route is chosen per connection, as a function, so the per-message path
has no branch for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import Callable

import msgspec
from nats import errors
from nats.aio.client import Client
from nats.aio.client import __version__ as NATS_PY_VERSION
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import parser as nats_parser
from nats.protocol.parser import Parser

from ..config import WIRE_ROUTE_ENV, WIRE_ROUTES
from . import natspy

log = logging.getLogger("streamsched.wire")

#: ``handler(subject, reply, payload, raw_headers)``; raw headers are the bytes of the
#: ``NATS/1.0`` block, or None. Called from the read loop: it must not block.
Handler = Callable[[str, str, bytes, "bytes | None"], None]

#: Header values: a dict, or a block already encoded (:func:`encode_headers`).
Headers = dict[str, str] | bytes | None

#: ``send(nc, subject, payload, reply, headers)``: one publish, buffered, not awaited.
Sender = Callable[[Client, str, bytes, str, Headers], None]

#: The environment variable that picks the route (``fast``, the default, or ``nats-py``).
ROUTE_ENV = WIRE_ROUTE_ENV


class FastParser(Parser):
    """nats-py's protocol parser, with a fast lane for ``MSG``/``HMSG`` of chosen subscriptions.

    It reads the regexes and constants of nats-py's parser module off the module when it
    uses them (control lines, once per read), not imported by name: a nats-py without one
    then fails the shape check at connect rather than this module's import.
    """

    def __init__(self, nc: Client) -> None:
        super().__init__(nc)
        self.nc: Client = nc
        self.handlers: dict[int, Handler] = {}

    async def parse(self, data: bytes = b"") -> None:
        if self.state != nats_parser.AWAITING_CONTROL_LINE:  # nats-py is in the middle of a message
            await super().parse(data)
            return
        buf = self.buf
        buf.extend(data)
        size = len(buf)
        pos = 0
        # Counted for ``nc.stats`` as nats-py counts them, added once per call (per read).
        received = received_bytes = 0
        try:
            while pos < size:
                if buf.startswith(b"HMSG ", pos):
                    skip, has_headers = 5, True
                elif buf.startswith(b"MSG ", pos):
                    skip, has_headers = 4, False
                else:  # PING, PONG, INFO, +OK, -ERR, or the start of a line yet to arrive
                    del buf[:pos]
                    size -= pos
                    pos = 0
                    used = await self._control_line()
                    if self.buf is not buf:  # a reconnect reset the parser meanwhile
                        return
                    if not used:
                        break
                    del buf[:used]
                    size -= used
                    continue
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    break
                # MSG <subject> <sid> [reply] <size> / HMSG <subject> <sid> [reply] <header size> <size>
                args = buf[pos + skip : line_end].split()
                header_len = int(args.pop(-2)) if has_headers else 0
                subject, sid, total = args[0], args[1], int(args[-1])
                reply = args[2] if len(args) == 4 else b""
                start = line_end + 2
                end = start + total
                if end + 2 > size:
                    break  # the rest of this message has not arrived yet
                headers = bytes(buf[start : start + header_len]) if header_len else None
                payload = bytes(buf[start + header_len : end])
                pos = end + 2
                handler = self.handlers.get(int(sid))
                if handler is None:
                    await self.nc._process_msg(int(sid), bytes(subject), bytes(reply), payload, headers)  # type: ignore[arg-type] # nats-py annotates headers as bytes, passes None
                    if self.buf is not buf:
                        return
                    continue
                received += 1
                received_bytes += total - header_len
                try:
                    handler(subject.decode(), reply.decode(), payload, headers)
                except Exception:
                    log.exception("handler for %s failed", subject.decode(errors="replace"))
        finally:
            if pos and self.buf is buf:
                del buf[:pos]
            if received:
                stats = self.nc.stats
                stats["in_msgs"] += received
                stats["in_bytes"] += received_bytes

    async def _control_line(self) -> int:
        """Handle the one control line at the start of the buffer as nats-py does; its length, or 0 if incomplete."""
        buf, nc = self.buf, self.nc
        if match := nats_parser.OK_RE.match(buf):
            pass
        elif match := nats_parser.ERR_RE.match(buf):
            await nc._process_err(match.group(1).decode().lower())
        elif match := nats_parser.PING_RE.match(buf):
            await nc._process_ping()
        elif match := nats_parser.PONG_RE.match(buf):
            await nc._process_pong()
        elif match := nats_parser.INFO_RE.match(buf):
            await nc._process_info(json.loads(match.group(1).decode()))
        elif len(buf) < nats_parser.MAX_CONTROL_LINE_SIZE and b"\r\n" in buf:
            raise errors.ProtocolError("nats: unknown protocol")
        else:
            return 0
        return match.end()


class Wire:
    """How one connection publishes and receives, chosen once by :func:`install`."""

    __slots__ = ("fast", "send")

    def __init__(self, fast: bool, send: Sender) -> None:
        self.fast = fast
        #: :func:`send` for this connection, without looking the route up: hold it for per-message use.
        self.send = send


#: Each connection's route. Weak keys: a closed client goes with its entry (values hold no client).
_routes: weakref.WeakKeyDictionary[Client, Wire] = weakref.WeakKeyDictionary()


def install(nc: Client) -> Wire:
    """Choose the route of a connected client, once (it holds across reconnects): the fast
    path, unless :func:`streamsched.transport.natspy.missing_pieces` finds something
    missing (then one warning) or ``STREAMSCHED_WIRE`` says ``nats-py``; else nats-py's own."""
    wire = _routes.get(nc)
    if wire is None:
        wire = _routes[nc] = _choose(nc)
    return wire


def _choose(nc: Client) -> Wire:
    route = os.environ.get(ROUTE_ENV, "fast")
    if route == "nats-py":
        return Wire(False, _send_through_nats_py)
    if route not in WIRE_ROUTES:
        raise ValueError(f"{ROUTE_ENV} must be 'fast' or 'nats-py', not {route!r}")
    missing = natspy.missing_pieces(nc)
    if missing:
        log.warning(
            "nats-py %s lacks what the fast wire path needs (%s); this connection publishes and "
            "receives through nats-py's own API instead (slower, same behaviour)",
            NATS_PY_VERSION,
            "; ".join(missing),
        )
        return Wire(False, _send_through_nats_py)
    old = nc._ps
    fast = FastParser(nc)
    # Carry over anything the old parser had buffered (normally nothing right after connect).
    fast.buf, fast.state, fast.needed, fast.header_needed, fast.msg_arg = (
        old.buf,
        old.state,
        old.needed,
        old.header_needed,
        old.msg_arg,
    )
    nc._ps = fast
    return Wire(True, _send_fast)


async def subscribe(nc: Client, subject: str, handler: Handler) -> Subscription:
    """Subscribe through nats-py (so reconnects re-subscribe) and route its messages to ``handler``."""
    if not install(nc).fast:
        return await _subscribe_through_nats_py(nc, subject, handler)

    async def unused(_msg: Msg) -> None:  # the parser never hands these subscriptions to nats-py
        pass

    sub = await nc.subscribe(subject, cb=unused, pending_msgs_limit=-1)
    parser = nc._ps
    assert isinstance(parser, FastParser)  # install put it there
    parser.handlers[sub._id] = handler
    return sub


async def unsubscribe(nc: Client, sub: Subscription) -> None:
    parser = getattr(nc, "_ps", None)
    if isinstance(parser, FastParser):
        parser.handlers.pop(sub._id, None)
    await sub.unsubscribe()


def send(nc: Client, subject: str, payload: bytes, reply: str = "", headers: Headers = None) -> None:
    """Publish without waiting, with nats-py's rules for a closed or reconnecting client.

    ``headers`` may be a block already encoded (:func:`encode_headers`), for a header
    that is the same shape on every message. Looks the connection's route up each time:
    per message, call ``install(nc).send`` instead (what :class:`~streamsched.transport.bus.Bus` does).
    """
    install(nc).send(nc, subject, payload, reply, headers)


def _send_fast(nc: Client, subject: str, payload: bytes, reply: str = "", headers: Headers = None) -> None:
    """:func:`send` on the fast path: the protocol line straight into nats-py's write buffer.

    Reads ``_max_payload`` rather than the public ``max_payload`` property, which costs
    30 ns more per message (a property call); ``pending_data_size`` is read through the
    property, on the rare reconnecting branch.
    """
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise errors.ConnectionDrainingError
    if " " in subject or "\r" in subject or "\n" in subject or not subject:
        raise errors.BadSubjectError
    size = len(payload)
    if size > nc._max_payload:
        raise errors.MaxPayloadError
    if headers:
        block = headers if type(headers) is bytes else encode_headers(headers)  # type: ignore[arg-type] # a dict otherwise
        command = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
            subject.encode(),
            reply.encode(),
            len(block),
            len(block) + size,
            block,
            payload,
        )
    else:
        command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size, payload)
    connected = nc.is_connected
    if not connected and nc.pending_data_size + len(command) > nc._max_pending_size:
        raise errors.OutboundBufferLimitError  # reconnecting, and the buffer is full
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    stats = nc.stats  # as nats-py counts: messages, and payload bytes without headers
    stats["out_msgs"] += 1
    stats["out_bytes"] += size
    queue = nc._flush_queue
    if connected and queue is not None and queue.empty():
        queue.put_nowait(asyncio.get_running_loop().create_future())  # wake the flusher


def _send_through_nats_py(nc: Client, subject: str, payload: bytes, reply: str = "", headers: Headers = None) -> None:
    """:func:`send` through nats-py's own ``publish`` (:func:`streamsched.transport.natspy.publish_now`)."""
    fields = parse_headers(headers) if isinstance(headers, bytes) else headers or None
    natspy.publish_now(nc, subject, payload, reply, fields)


async def _subscribe_through_nats_py(nc: Client, subject: str, handler: Handler) -> Subscription:
    """:func:`subscribe` through a nats-py subscription and its callback task."""

    def deliver(msg: Msg) -> None:
        handler(msg.subject, msg.reply, msg.data, _header_block(msg.headers))

    return await natspy.subscribe(nc, subject, deliver)


def _header_block(headers: dict[str, str] | None) -> bytes | None:
    """nats-py's parsed headers as a ``NATS/1.0`` block again, with an inline status
    (``Status``/``Description``) back on the first line, where the server put it."""
    if not headers:
        return None
    if "Status" not in headers:
        return encode_headers(headers)
    rest = dict(headers)
    status = " ".join(filter(None, (rest.pop("Status"), rest.pop("Description", ""))))
    return b"NATS/1.0 " + status.encode() + encode_headers(rest)[len(b"NATS/1.0") :]


def encode_headers(headers: dict[str, str]) -> bytes:
    """The ``NATS/1.0`` header block; line breaks inside a value become spaces."""
    text = "NATS/1.0\r\n" + "".join([f"{key}: {value}\r\n" for key, value in headers.items()]) + "\r\n"
    lines = len(headers) + 2
    if text.count("\n") != lines or text.count("\r") != lines:  # a value would break the block
        return encode_headers({key: " ".join(value.split()) for key, value in headers.items()})
    return text.encode()


def header_value(raw: bytes, name: str) -> str | None:
    """One header's value from a raw ``NATS/1.0`` block, without parsing the rest (a hop
    that forwards the block needs one value of it). ``None`` if it is not there as
    written (``name`` is matched exactly, as the block's own writer spelled it), and also
    when its line is unterminated or not UTF-8: anyone can publish such a block to a stream,
    and a hop must then act as for a missing header rather than fail on every delivery."""
    key = b"\r\n" + name.encode() + b":"
    start = raw.find(key)
    if start < 0:
        return None
    start += len(key)
    end = raw.find(b"\r\n", start)
    if end < 0:
        return None
    try:
        return raw[start:end].decode().strip()
    except UnicodeDecodeError:
        return None


def with_header(raw: bytes, name: str, value: str) -> bytes:
    """The raw header block with ``name`` set to ``value`` (replaced, or added at the end).
    ``value`` must be one line (the caller's own, e.g. a msg id)."""
    key = b"\r\n" + name.encode() + b":"
    line = b"%s %s" % (key, value.encode())
    start = raw.find(key)
    if start < 0:
        return raw[:-2] + line[2:] + b"\r\n\r\n"  # the block ends with an empty line
    return raw[:start] + line + raw[raw.index(b"\r\n", start + len(key)) :]


def parse_headers(raw: bytes) -> dict[str, str]:
    """Header block to dict, as nats-py does it (an inline status becomes ``Status``/``Description``)."""
    lines = raw.decode(errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    first = lines[0]
    if len(first) > 8:  # "NATS/1.0 408 Request Timeout"
        status, _, description = first[9:].strip().partition(" ")
        headers["Status"] = status
        if description:
            headers["Description"] = description
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


def delivery_info(reply: str) -> tuple[int, int, int]:
    """``(num_delivered, stream_seq, num_pending)`` from a JetStream ack subject.

    Parsed by hand because ``Msg.metadata`` builds datetimes we do not need per message.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4]), int(tokens[5]), int(tokens[8])
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<token>]
    return int(tokens[6]), int(tokens[7]), int(tokens[10])


class Delivery(msgspec.Struct, gc=False):
    """A message of a stream delivered to a pull request: what the roles use of nats-py's ``Msg``.

    ``num_delivered``, ``stream_seq`` and ``num_pending`` come from the ack subject,
    parsed once. The header block stays raw: each role looks up the few values it needs
    with :func:`header_value`. A struct untracked by the cyclic garbage collector (it
    holds strings and bytes), since a role holds thousands of deliveries at a time.
    """

    subject: str
    reply: str
    data: bytes
    raw_headers: bytes | None
    num_delivered: int = 0
    stream_seq: int = 0
    num_pending: int = 0

    def __post_init__(self) -> None:
        self.num_delivered, self.stream_seq, self.num_pending = delivery_info(self.reply)
