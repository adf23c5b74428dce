"""The fast protocol parser: every message reaches the right place, whatever the chunking."""

from __future__ import annotations

import asyncio

from streamsched.transport.wire import (
    FastParser,
    encode_headers,
    header_value,
    parse_headers,
    with_header,
)


class FakeClient:
    """What the parser calls on nats-py's client, recorded."""

    def __init__(self) -> None:
        self.slow: list[tuple[int, bytes, bytes, bytes, bytes | None]] = []
        self.pings = 0
        self.pongs = 0
        self.infos: list[dict] = []

    async def _process_msg(self, sid, subject, reply, data, headers):
        self.slow.append((sid, subject, reply, data, headers))

    async def _process_ping(self):
        self.pings += 1

    async def _process_pong(self):
        self.pongs += 1

    async def _process_info(self, info):
        self.infos.append(info)


def _stream() -> bytes:
    block = encode_headers({"Streamsched-Task-Id": "t1", "Nats-Msg-Id": "t1:work:1"})
    status = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n"
    return b"".join([
        b"MSG fast.a 1 $JS.ACK.S.C.1.5.5.1.0 5\r\nhello\r\n",
        b"PING\r\n",
        b"HMSG fast.b 1 %d %d\r\n%s\r\n" % (len(status), len(status), status),
        b"+OK\r\n",
        b"MSG slow.a 2 reply.x 3\r\nabc\r\n",
        b'INFO {"server_id":"x"}\r\n',
        b"HMSG fast.c 1 r.1 %d %d\r\n%sbody\r\n" % (len(block), len(block) + 4, block),
        b"PONG\r\n",
        b"MSG fast.d 1 0\r\n\r\n",
    ])


def _parse_in_chunks(chunk: int) -> tuple[FakeClient, list[tuple]]:
    client = FakeClient()
    parser = FastParser(client)  # type: ignore[arg-type]  # a stand-in for the nats-py client
    fast: list[tuple] = []
    parser.handlers[1] = lambda *args: fast.append(args)
    data = _stream()

    async def feed() -> None:
        for i in range(0, len(data), chunk):
            await parser.parse(data[i : i + chunk])

    asyncio.run(feed())
    assert not parser.buf  # everything consumed
    return client, fast


def test_every_message_and_control_line_is_delivered_once_in_order_whatever_the_chunking():
    for chunk in (1, 2, 3, 7, 16, 64, 10_000):
        client, fast = _parse_in_chunks(chunk)
        assert [f[0] for f in fast] == ["fast.a", "fast.b", "fast.c", "fast.d"], chunk
        assert fast[0][1:3] == ("$JS.ACK.S.C.1.5.5.1.0", b"hello")
        assert parse_headers(fast[1][3]) == {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "3"}
        assert fast[2][1:3] == ("r.1", b"body")
        assert parse_headers(fast[2][3]) == {"Streamsched-Task-Id": "t1", "Nats-Msg-Id": "t1:work:1"}
        assert fast[3] == ("fast.d", "", b"", None)
        # A subscription without a fast handler goes to nats-py unchanged.
        assert client.slow == [(2, b"slow.a", b"reply.x", b"abc", None)]
        assert (client.pings, client.pongs, client.infos) == (1, 1, [{"server_id": "x"}])


def test_header_values_with_line_breaks_cannot_break_the_protocol():
    block = encode_headers({"Streamsched-Error": "line one\r\nline two\nthree"})
    assert parse_headers(block) == {"Streamsched-Error": "line one line two three"}


def test_a_hop_reads_one_header_and_sets_another_without_parsing_the_block():
    block = encode_headers({"Nats-Msg-Id": "t1:sched:0", "Streamsched-Task-Id": "t1", "Streamsched-Type": "echo"})
    assert header_value(block, "Streamsched-Task-Id") == "t1"
    assert header_value(block, "Nats-Msg-Id") == "t1:sched:0"  # the first line too
    assert header_value(block, "Streamsched-Region") is None
    replaced = with_header(block, "Nats-Msg-Id", "t1:work:0")
    assert parse_headers(replaced) == {"Nats-Msg-Id": "t1:work:0", "Streamsched-Task-Id": "t1", "Streamsched-Type": "echo"}
    added = with_header(encode_headers({"Streamsched-Task-Id": "t1"}), "Nats-Msg-Id", "t1:work:0")
    assert parse_headers(added) == {"Streamsched-Task-Id": "t1", "Nats-Msg-Id": "t1:work:0"}
    assert added.endswith(b"\r\n\r\n")
