"""wire's pure helpers: header blocks written, read and rewritten without parsing the rest,
the fields of an ack subject, and how the nats-py route finishes a publish that paused.
(The routes themselves run against a real server: tests/integration/test_wire_routes.py.)"""

from __future__ import annotations

import asyncio

from streamsched.transport.natspy import _Resumed
from streamsched.transport.wire import (
    _header_block,
    delivery_info,
    encode_headers,
    header_value,
    parse_headers,
    with_header,
)


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


def test_an_inline_status_reads_as_status_and_description():
    raw = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 3\r\n\r\n"
    assert parse_headers(raw) == {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "3"}
    assert parse_headers(b"NATS/1.0 503\r\n\r\n") == {"Status": "503"}


def test_headers_parsed_by_nats_py_become_a_block_that_reads_the_same():
    """The nats-py route hands handlers a block rebuilt from nats-py's dict: an inline
    status goes back on the first line, where :func:`parse_headers` looks for it."""
    for headers in (
        {"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "3"},
        {"Status": "503"},
        {"Status": "100", "Description": "Idle Heartbeat", "Nats-Last-Consumer": "7"},
        {"Nats-Msg-Id": "t1:work:0", "Streamsched-Task-Id": "t1"},
    ):
        block = _header_block(headers)
        assert block is not None and block.endswith(b"\r\n\r\n")
        assert parse_headers(block) == headers
    assert _header_block({"Status": "404", "Description": "No Messages"}) == b"NATS/1.0 404 No Messages\r\n\r\n"
    assert _header_block(None) is None and _header_block({}) is None


def test_delivery_info_reads_the_ack_subject_with_and_without_a_domain():
    assert delivery_info("$JS.ACK.WORK.w.2.15.9.1700000000000000000.4") == (2, 15, 4)
    assert delivery_info("$JS.ACK.hub.ACC.WORK.w.3.16.10.1700000000000000000.0.token") == (3, 16, 0)


def test_a_coroutine_run_up_to_a_pause_finishes_only_after_what_it_waited_for():
    """What the nats-py route does with a ``publish`` that paused: a task resumes it
    once the future it yielded is done, and a bare yield (``sleep(0)``) is one turn."""

    async def scenario() -> list[str]:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        steps: list[str] = []

        async def publish() -> None:
            steps.append("appended")
            await gate
            await asyncio.sleep(0)
            steps.append("flushed")

        coroutine = publish()
        pause = coroutine.send(None)  # what publish_now does
        assert pause is gate and steps == ["appended"]

        async def finish() -> None:
            await _Resumed(coroutine, pause)

        task = asyncio.get_running_loop().create_task(finish())
        for _ in range(3):
            await asyncio.sleep(0)
        assert steps == ["appended"] and not task.done()  # still waiting on the gate
        gate.set_result(None)
        await asyncio.wait_for(task, 1)
        return steps

    assert asyncio.run(scenario()) == ["appended", "flushed"]
