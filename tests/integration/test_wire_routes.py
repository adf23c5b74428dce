"""wire's two routes on real connections to a real server.

The fast path must put on the wire what nats-py's ``publish`` puts there, count what
nats-py counts, and hand over every message however the reads split them; its shape
check must pass on the pinned nats-py and name what is missing otherwise; and the
nats-py route it falls back to must carry a Bus end to end.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest
from nats import errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, StreamConfig
from nats.protocol import parser as nats_parser

from streamsched.transport import natspy, wire
from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer

pytestmark = pytest.mark.anyio

Connect = Callable[..., Awaitable[Client]]
HEADERS = {"Nats-Msg-Id": "t1:work:1", "Streamsched-Task-Id": "t1", "Streamsched-Type": "echo"}


@pytest.fixture
async def connect(server: NatsServer) -> AsyncIterator[Connect]:
    """Plain nats-py connections to the test's server, closed at the end."""
    opened: list[Client] = []

    async def open_connection(**options: Any) -> Client:
        nc = await nats.connect(server.url, **options)
        opened.append(nc)
        return nc

    yield open_connection
    for nc in opened:
        if not nc.is_closed:
            await nc.close()


def recorder(into: list[tuple[str, str, bytes, bytes | None]]) -> wire.Handler:
    def record(subject: str, reply: str, data: bytes, raw: bytes | None) -> None:
        into.append((subject, reply, data, raw))

    return record


async def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


class RawSubscriber:
    """A bare TCP client of the server: each ``MSG``/``HMSG`` frame exactly as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: NatsServer, subject: str) -> RawSubscriber:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"headers":true,"protocol":1}\r\nSUB %s 1\r\nPING\r\n' % subject.encode())
        while not (await reader.readline()).startswith(b"PONG"):
            pass
        return cls(reader, writer)

    async def frame(self) -> bytes:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")
            elif line.startswith((b"MSG ", b"HMSG ")):
                return line + await self.reader.readexactly(int(line.split()[-1]) + 2)

    def close(self) -> None:
        self.writer.close()


async def test_the_shape_check_passes_on_the_pinned_nats_py_and_the_fast_path_is_installed(connect: Connect):
    assert importlib.metadata.version("nats-py").startswith("2.16.")  # pyproject.toml's pin
    nc = await connect()
    assert natspy.missing_pieces(nc) == []
    route = wire.install(nc)
    assert route.fast and type(nc._ps) is wire.FastParser
    assert wire.install(nc) is route  # chosen once per connection


async def test_fast_sends_put_on_the_wire_what_nats_py_publish_puts_there(server: NatsServer, connect: Connect):
    plain, fast = await connect(), await connect()
    assert wire.install(fast).fast
    raw = await RawSubscriber.open(server, "same.>")
    try:
        cases: list[tuple[str, bytes, str, dict[str, str] | None]] = [
            ("same.plain", b"hello", "", None),
            ("same.reply", b"hello", "_INBOX.abc.1", None),
            ("same.headers", b"hello", "", HEADERS),
            ("same.both", b'{"id":"t1"}', "_INBOX.abc.2", HEADERS),
            ("same.empty", b"", "", None),
            ("same.empty.headers", b"", "_INBOX.abc.3", {"Nats-Msg-Id": "x"}),
            ("same.large", bytes(range(256)) * 1200, "_INBOX.abc.4", HEADERS),  # 300 KB, several reads
        ]
        for subject, payload, reply, headers in cases:
            await plain.publish(subject, payload, reply=reply, headers=headers)
            await plain.flush()
            wire.send(fast, subject, payload, reply, headers)
            await fast.flush()
            by_nats_py, by_wire = await raw.frame(), await raw.frame()
            assert by_wire == by_nats_py, subject
        # A block encoded once and sent as bytes is the same as the dict it came from.
        wire.send(fast, "same.block", b"x", "", wire.encode_headers(HEADERS))
        await plain.publish("same.block", b"x", headers=HEADERS)
        assert await raw.frame() == await raw.frame()
    finally:
        raw.close()


async def test_the_fast_parser_delivers_every_message_once_in_order_whatever_the_chunking(connect: Connect, monkeypatch: pytest.MonkeyPatch):
    """Fed by hand, over a real client: its subscriptions, control-line handlers and counters."""
    nc = await connect()
    slow = await nc.subscribe("slow.>")  # nats-py's own: reached through its _process_msg
    calls: list[str] = []
    for name in ("_process_ping", "_process_pong", "_process_info"):
        original = getattr(nc, name)

        async def spy(*args: Any, _name: str = name, _original: Any = original) -> None:
            calls.append(_name)
            await _original(*args)

        monkeypatch.setattr(nc, name, spy)
    status = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n"
    block = wire.encode_headers(HEADERS)
    stream = b"".join(
        [
            b"MSG fast.a 900 $JS.ACK.S.C.1.5.5.1.0 5\r\nhello\r\n",
            b"PING\r\n",
            b"HMSG fast.b 900 %d %d\r\n%s\r\n" % (len(status), len(status), status),
            b"+OK\r\n",
            b"MSG slow.a %d reply.x 3\r\nabc\r\n" % slow._id,
            b'INFO {"server_id":"x"}\r\n',
            b"HMSG fast.c 900 r.1 %d %d\r\n%sbody\r\n" % (len(block), len(block) + 4, block),
            b"PONG\r\n",
            b"MSG fast.d 900 0\r\n\r\n",
        ]
    )
    for chunk in (1, 2, 3, 7, 16, 64, 10_000):
        parser = wire.FastParser(nc)
        fast: list[tuple[str, str, bytes, bytes | None]] = []
        parser.handlers[900] = recorder(fast)
        calls.clear()
        before = dict(nc.stats)
        for i in range(0, len(stream), chunk):  # no await here lets the client's own read loop run
            await parser.parse(stream[i : i + chunk])
        handled = list(calls)
        assert not parser.buf, chunk  # everything consumed
        assert [f[0] for f in fast] == ["fast.a", "fast.b", "fast.c", "fast.d"], chunk
        assert fast[0][1:3] == ("$JS.ACK.S.C.1.5.5.1.0", b"hello")
        assert fast[1][3] is not None
        assert wire.parse_headers(fast[1][3]) == {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "3"}
        assert fast[2][1:3] == ("r.1", b"body") and fast[2][3] == block
        assert fast[3] == ("fast.d", "", b"", None)
        msg = await slow.next_msg(timeout=1)
        assert (msg.subject, msg.reply, msg.data) == ("slow.a", "reply.x", b"abc")
        assert handled == ["_process_ping", "_process_info", "_process_pong"], chunk
        # Counted as nats-py counts: every message, and payload bytes without headers.
        assert nc.stats["in_msgs"] - before["in_msgs"] == 5
        assert nc.stats["in_bytes"] - before["in_bytes"] == len(b"helloabcbody")


async def test_the_fast_parser_hands_its_subscriptions_to_handlers_and_the_rest_to_nats_py(connect: Connect):
    nc, publisher = await connect(), await connect()
    assert wire.install(nc).fast
    fast: list[tuple[str, str, bytes, dict[str, str]]] = []
    slow: list[Msg] = []

    def on_fast(subject: str, reply: str, data: bytes, raw: bytes | None) -> None:
        fast.append((subject, reply, data, wire.parse_headers(raw) if raw else {}))

    async def on_slow(msg: Msg) -> None:
        slow.append(msg)

    async def respond(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await wire.subscribe(nc, "fast.>", on_fast)
    await nc.subscribe("slow.>", cb=on_slow)
    await publisher.subscribe("service", cb=respond)
    await publisher.flush()
    await nc.flush()  # the server has the subscriptions before the publishes
    large = bytes(range(256)) * 1200
    sent = []
    for i in range(200):
        headers = {"N": str(i)} if i % 3 else None
        payload = large if i == 100 else str(i).encode()
        reply = f"r.{i}" if i % 2 else ""
        sent.append((f"fast.{i}", reply, payload, headers or {}))
        await publisher.publish(f"fast.{i}", payload, reply=reply, headers=headers)
        if i % 50 == 0:
            await publisher.publish(f"slow.{i}", b"s", headers={"K": "v"})
    await publisher.flush()
    await wait_for(lambda: len(fast) == 200 and len(slow) == 4)
    assert fast == sent
    assert [(m.subject, m.data, m.headers) for m in slow] == [(f"slow.{i}", b"s", {"K": "v"}) for i in (0, 50, 100, 150)]
    assert (await nc.request("service", b"1", timeout=2)).data == b"pong:1"  # nats-py's own mux inbox
    assert (await nc.jetstream().account_info()).streams == 0  # and the JetStream API


async def test_fast_sends_and_receives_count_as_nats_py_counts(connect: Connect):
    plain, fast = await connect(), await connect()
    assert wire.install(fast).fast
    received = {"plain": 0, "fast": 0}

    def on_fast(_subject: str, _reply: str, _data: bytes, _raw: bytes | None) -> None:
        received["fast"] += 1

    async def on_plain(_msg: Msg) -> None:
        received["plain"] += 1

    async def on_fast_slow(_msg: Msg) -> None:
        received["fast"] += 1

    await plain.subscribe("stats.plain.>", cb=on_plain)
    await wire.subscribe(fast, "stats.fast.q.>", on_fast)
    await fast.subscribe("stats.fast.slow", cb=on_fast_slow)  # through nats-py's parser
    for i in range(50):
        payload = b"x" * (i * 37)
        headers = {"N": str(i)} if i % 2 else None
        tail = "slow" if i % 10 == 0 else f"q.{i}"
        await plain.publish(f"stats.plain.{tail}", payload, reply="r", headers=headers)
        wire.send(fast, f"stats.fast.{tail}", payload, "r", headers)
    await plain.flush()
    await fast.flush()
    await wait_for(lambda: received == {"plain": 50, "fast": 50})
    keys = ("in_msgs", "in_bytes", "out_msgs", "out_bytes")
    assert {key: fast.stats[key] for key in keys} == {key: plain.stats[key] for key in keys}
    assert fast.stats["in_msgs"] == 50 and fast.stats["out_bytes"] == sum(i * 37 for i in range(50))


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (lambda nc, m: m.delattr(nc, "_pending_data_size"), "Client._pending_data_size (int)"),
        (lambda nc, m: m.delattr(nc, "_flush_queue"), "Client._flush_queue (Queue or NoneType)"),
        (lambda nc, m: m.setattr(nc, "_pending", ()), "Client._pending (list)"),
        (lambda nc, m: m.delattr(nc._ps, "header_needed"), "Parser.header_needed (int)"),
        (lambda nc, m: m.delattr(nc._ps, "msg_arg"), "Parser.msg_arg (dict)"),
        (lambda nc, m: m.delitem(nc.stats, "in_bytes"), "Client.stats['in_bytes'] (int)"),
        (lambda nc, m: m.delattr(nats_parser, "INFO_RE"), "nats.protocol.parser.INFO_RE (a bytes regex with 1 groups)"),
        (lambda nc, m: m.delattr(nats_parser, "AWAITING_CONTROL_LINE"), "nats.protocol.parser.AWAITING_CONTROL_LINE (int)"),
        (lambda nc, m: m.delattr(nats_parser.Parser, "reset"), "Parser.reset"),
        (
            lambda nc, m: m.setattr(nc, "_process_msg", _four_arguments),
            "Client._process_msg (a coroutine taking 5 arguments)",
        ),
        (lambda nc, m: m.delattr(Client, "_process_pong"), "Client._process_pong (a coroutine taking 0 arguments)"),
        (lambda nc, m: m.setattr(Subscription, "__init__", _no_id), "Subscription._id (the subscription id)"),
    ],
)
async def test_the_shape_check_names_the_piece_that_is_missing(
    connect: Connect, monkeypatch: pytest.MonkeyPatch, break_it: Callable[[Client, pytest.MonkeyPatch], None], named: str
):
    nc = await connect()
    with monkeypatch.context() as patch:
        break_it(nc, patch)
        assert natspy.missing_pieces(nc) == [named]
    assert natspy.missing_pieces(nc) == []


async def _four_arguments(sid: int, subject: bytes, reply: bytes, data: bytes) -> None:
    pass


def _no_id(self: Subscription, conn: Any, id: int = 0, *args: Any, **kwargs: Any) -> None:
    self._conn = conn


async def bus_on_route(connect: Connect, route: str, monkeypatch: pytest.MonkeyPatch) -> Bus:
    """A Bus whose connection took ``route``: ``fast``; ``forced`` (by STREAMSCHED_WIRE);
    ``missing`` (a private attribute gone while the Bus installs, back afterwards, so
    that nats-py's own code, which the fallback runs, works)."""
    with monkeypatch.context() as patch:
        if route == "forced":
            patch.setenv(wire.ROUTE_ENV, "nats-py")
        nc = await connect()
        if route == "missing":
            patch.delattr(nc, "_pending_data_size")
        bus = Bus(nc)
    await bus.start()
    assert wire.install(nc).fast is (route == "fast")
    assert (type(nc._ps) is wire.FastParser) is (route == "fast")
    return bus


async def exercise(bus: Bus) -> dict[str, Any]:
    """Publish, subscribe, pull and request through a Bus; what it saw."""
    js = bus.nc.jetstream()
    await js.add_stream(StreamConfig(name="W", subjects=["w.>"]))
    await js.add_consumer("W", ConsumerConfig(durable_name="c", ack_policy="explicit"))
    # JetStream publishes: their PubAcks come back through Bus's own subscription.
    acks = [
        await bus.publish("w.a", b"one", {"Nats-Msg-Id": "1"}),
        await bus.publish("w.b", b"two", wire.encode_headers({"Nats-Msg-Id": "2", "Streamsched-Task-Id": "t2"})),
        await bus.publish("w.a", b"one again", {"Nats-Msg-Id": "1"}),
    ]
    pub_acks = [await asyncio.wait_for(ack, 5) for ack in acks]
    # A pull request sent with Bus.send; deliveries and the closing status on a Bus subscription.
    pulled: list[tuple[str, bytes, dict[str, str]]] = []
    inbox = bus.nc.new_inbox()
    await bus.subscribe(inbox, lambda _s, reply, data, raw: pulled.append((reply[:8], data, wire.parse_headers(raw) if raw else {})))
    bus.send("$JS.API.CONSUMER.MSG.NEXT.W.c", b'{"batch":5,"no_wait":true}', inbox)
    await wait_for(lambda: len(pulled) == 3)
    # Core publish and subscribe, headers and empty payload included.
    core: list[tuple[str, str, bytes, bytes | None]] = []
    await bus.subscribe("core.>", lambda *args: core.append(args))
    bus.send("core.a", b"", "reply.a", {"A": "b"})
    bus.send("core.b", b"payload")
    await wait_for(lambda: len(core) == 2)
    info = await js.consumer_info("W", "c")  # a request through nats-py on the same connection
    return {
        "pub_acks": [(ack["seq"], ack.get("duplicate", False)) for ack in pub_acks],
        "pulled": pulled,
        "core": core,
        "delivered": info.delivered.stream_seq,
        "counted": bus.nc.stats["in_msgs"] > 0 and bus.nc.stats["out_msgs"] > 0,
    }


@pytest.mark.parametrize("route", ["fast", "forced", "missing"])
async def test_a_bus_works_the_same_on_every_route(connect: Connect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, route: str):
    caplog.set_level(logging.WARNING, logger="streamsched.wire")
    bus = await bus_on_route(connect, route, monkeypatch)
    try:
        seen = await exercise(bus)
    finally:
        await bus.close()
    assert seen == {
        "pub_acks": [(1, False), (2, False), (1, True)],
        "pulled": [
            ("$JS.ACK.", b"one", {"Nats-Msg-Id": "1"}),
            ("$JS.ACK.", b"two", {"Nats-Msg-Id": "2", "Streamsched-Task-Id": "t2"}),
            ("", b"", {"Status": "404", "Description": "No Messages"}),
        ],
        "core": [("core.a", "reply.a", b"", b"NATS/1.0\r\nA: b\r\n\r\n"), ("core.b", "", b"payload", None)],
        "delivered": 2,
        "counted": True,
    }
    warnings = [record.getMessage() for record in caplog.records if record.name == "streamsched.wire"]
    if route == "missing":
        assert len(warnings) == 1 and "Client._pending_data_size (int)" in warnings[0]
    else:
        assert warnings == []


async def test_two_connections_in_one_process_keep_their_own_routes(connect: Connect, monkeypatch: pytest.MonkeyPatch):
    fallback = await bus_on_route(connect, "missing", monkeypatch)
    fast = await bus_on_route(connect, "fast", monkeypatch)
    try:
        got: dict[str, list[bytes]] = {"fast": [], "fallback": []}
        await fast.subscribe("to.fast", lambda _s, _r, data, _h: got["fast"].append(data))
        await fallback.subscribe("to.fallback", lambda _s, _r, data, _h: got["fallback"].append(data))
        await fast.nc.flush()
        await fallback.nc.flush()
        for i in range(20):
            fast.send("to.fallback", b"%d" % i)
            fallback.send("to.fast", b"%d" % i)
        await wait_for(lambda: len(got["fast"]) == len(got["fallback"]) == 20)
        assert got["fast"] == got["fallback"] == [b"%d" % i for i in range(20)]
        assert wire.install(fast.nc).fast and not wire.install(fallback.nc).fast
    finally:
        await fast.close()
        await fallback.close()


@pytest.mark.parametrize("route", ["fast", "nats-py"])
async def test_send_refuses_at_once_what_it_cannot_send(connect: Connect, monkeypatch: pytest.MonkeyPatch, route: str):
    monkeypatch.setenv(wire.ROUTE_ENV, route)
    nc = await connect()
    assert wire.install(nc).fast is (route == "fast")
    with pytest.raises(errors.BadSubjectError):
        wire.send(nc, "two words", b"x")
    with pytest.raises(errors.BadSubjectError):
        wire.send(nc, "", b"x")
    with pytest.raises(errors.MaxPayloadError):
        wire.send(nc, "big", b"x" * (nc.max_payload + 1))
    await nc.close()
    with pytest.raises(errors.ConnectionClosedError):
        wire.send(nc, "closed", b"x")


async def test_the_nats_py_route_keeps_the_order_when_publish_pauses_for_a_flush(
    connect: Connect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """With a tiny ``pending_size`` every nats-py publish waits for a flush: the first
    pauses, the later ones queue behind it, and all arrive in the order sent."""
    caplog.set_level(logging.ERROR)
    monkeypatch.setenv(wire.ROUTE_ENV, "nats-py")
    nc, receiver = await connect(pending_size=64), await connect()
    got: list[bytes] = []
    await wire.subscribe(receiver, "seq", lambda _s, _r, data, _h: got.append(data))
    await receiver.flush()
    for i in range(100):
        wire.send(nc, "seq", b"%040d" % i, "", {"N": str(i)} if i % 2 else None)
    assert natspy._paused  # it did pause, and the rest queued
    # A flush per publish, one after the other: generous deadlines for a loaded machine.
    await wait_for(lambda: len(got) == 100, timeout_s=30)
    assert got == [b"%040d" % i for i in range(100)]
    await wait_for(lambda: not natspy._paused, timeout_s=30)
    assert nc.stats["out_msgs"] == 100  # nats-py counted its own publishes
    assert [record.getMessage() for record in caplog.records] == []  # each paused publish finished cleanly


async def test_an_unknown_route_is_refused_at_connect(connect: Connect, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(wire.ROUTE_ENV, "turbo")
    nc = await connect()
    with pytest.raises(ValueError, match="STREAMSCHED_WIRE must be 'fast' or 'nats-py', not 'turbo'"):
        wire.install(nc)
