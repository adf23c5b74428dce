"""Properties of ingress: whatever bytes arrive, the master either rejects them with a reason
or the worker decodes them to the payload the master saw.

Inputs are envelopes drawn over every field, then corrupted at the byte level (bit flips,
truncation, deletions, invalid UTF-8, JSON fragments such as lone surrogate escapes or
``NaN``). The master's side is :meth:`Master.validate`, the worker's its own ``_call`` with
an echo handler: the two code paths a submission really takes, without a server.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamsched.config import Settings
from streamsched.errors import Rejected
from streamsched.model import (
    MAX_PAYLOAD_DEPTH,
    PRIORITIES,
    nests_deeper_than,
)
from streamsched.registry import Registry, TaskContext, TaskDef
from streamsched.roles.master import Master
from streamsched.roles.worker import Worker
from streamsched.transport.bus import Bus

#: Bounded for a loaded 2-core CI: no per-example deadline, a fixed number of examples.
BOUNDED = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SETTINGS = Settings.load({}, regions=("default", "eu"))


async def _echo(payload: Any) -> Any:
    return payload


ECHO = TaskDef(name="echo", fn=_echo)
CONTEXT = TaskContext(id="t", type="echo", attempt=1, max_attempts=3, priority="medium", region="default", worker="w")


@pytest.fixture(scope="module")
def roles() -> tuple[Master, Worker]:
    """A master and a worker on a bus that never connects: only their decoding is used."""
    bus = Bus(nats.NATS())
    return Master(SETTINGS, bus), Worker(SETTINGS, bus, Registry([ECHO]), region="default", concurrency=1)


def worker_payload(worker: Worker, body: bytes) -> Any:
    """The payload the worker's echo handler receives for ``body`` (what it returns)."""
    return asyncio.run(worker._call(ECHO, body, CONTEXT, None))


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON value."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    return 0 if children is None else 1 + max(map(json_depth, children), default=0)


def _nested(depth: int) -> Any:
    value: Any = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


#: Any JSON value, strings over all of Unicode (escaped or raw UTF-8 once encoded).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
#: Payloads, including some around the depth limit.
payloads = json_values | st.integers(MAX_PAYLOAD_DEPTH - 2, MAX_PAYLOAD_DEPTH + 2).map(_nested)
tokens = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)

valid_envelopes = st.fixed_dictionaries(
    {"type": st.from_regex(r"[A-Za-z0-9_:/-]{1,20}(\.[A-Za-z0-9_:/-]{1,20})?", fullmatch=True)},
    optional={
        "id": tokens,
        "payload": payloads,
        "priority": st.sampled_from(PRIORITIES),
        "region": st.sampled_from(SETTINGS.regions),
        "timeout_s": st.floats(min_value=0.001, max_value=1e6),
        "max_attempts": st.integers(1, SETTINGS.max_deliver),
        "labels": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    },
)
#: Valid envelopes that all have a payload: most corruptions are to be tried there.
with_payloads = st.builds(lambda envelope, payload: {**envelope, "payload": payload}, valid_envelopes, payloads)
#: Envelopes whose fields may also hold values of the wrong kind, unsupported or unknown fields.
any_envelopes = st.fixed_dictionaries(
    {"type": st.text(max_size=20) | st.integers()},
    optional={
        "id": st.none() | tokens | st.text(max_size=20) | st.integers(),
        "payload": payloads,
        "priority": st.sampled_from(PRIORITIES) | st.text(max_size=8),
        "region": st.none() | st.sampled_from((*SETTINGS.regions, "mars")),
        "timeout_s": st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=3),
        "max_attempts": st.none() | st.integers(-5, 500) | st.floats(allow_nan=False, allow_infinity=False),
        "labels": st.dictionaries(st.text(max_size=10), st.text(max_size=10) | st.integers(), max_size=3),
        "depends_on": st.lists(tokens, max_size=2),
        "cron": st.none() | st.text(max_size=5),
        "priorty": st.text(max_size=5),
    },
)


@st.composite
def encoded(draw: st.DrawFn, envelopes: st.SearchStrategy[dict[str, Any]]) -> bytes:
    """An envelope as msgspec writes it (raw UTF-8) or as Python's json does (``\\u`` escapes,
    surrogate pairs for characters past U+FFFF, optional indentation)."""
    envelope = draw(envelopes)
    if draw(st.booleans()):
        return msgspec.json.encode(envelope)
    return json.dumps(envelope, ensure_ascii=draw(st.booleans()), indent=draw(st.none() | st.integers(0, 2))).encode()


#: Byte strings spliced in: invalid UTF-8 (a stray continuation byte, overlong, surrogate,
#: past U+10FFFF, truncated sequences), and JSON that no decoder should accept in that place.
SPLICES = [
    b"\xff",
    b"\x80",
    b"\xc0\xaf",
    b"\xc3",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\\ud800",
    b"\\udc00",
    b"\\ud800\\u0041",
    b"\\",
    b'"',
    b"[",
    b"{",
    b"]",
    b"}",
    b",",
    b":",
    b"\x00",
    b"\t",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"9" * 5000,
    b"\xef\xbb\xbf",
    b"[" * 5000,
    b"]" * 50,
]


#: Numbers put where a number was: out of every decoder's range, or not JSON at all.
BAD_NUMBERS = [b"1e400", b"-1e999", b"9" * 5000, b"NaN", b"Infinity", b"0x10", b"01", b"1."]
_NUMBER = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    """A valid or almost valid envelope with one to three byte-level corruptions. Some aim
    inside strings (right after a quote) and at numbers, where a corruption leaves the
    rest of the JSON intact and only a full decode of the payload can see it."""
    data = bytearray(draw(encoded(with_payloads | any_envelopes)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "delete", "splice", "byte", "in_string", "number"]))
        quotes = [i + 1 for i, byte in enumerate(data) if byte == ord('"')]
        numbers = list(_NUMBER.finditer(data))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "splice":
            data[at:at] = draw(st.sampled_from(SPLICES))
        elif kind == "byte" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "in_string" and quotes:
            at = draw(st.sampled_from(quotes))
            data[at:at] = draw(st.sampled_from(SPLICES))
        elif kind == "number" and numbers:
            number = draw(st.sampled_from(numbers))
            data[number.start() : number.end()] = draw(st.sampled_from(BAD_NUMBERS))
    return bytes(data)


#: Stands for the spot in a payload string where :func:`poisoned` splices bytes in.
_SPOT = "\x1fspot\x1f"


@st.composite
def poisoned(draw: st.DrawFn) -> bytes:
    """A valid envelope with bytes spliced into a string of its payload, however deep: the
    JSON around them stays intact, so only a full decode of the payload can refuse them."""
    text = draw(st.text(max_size=5)) + _SPOT + draw(st.text(max_size=5))
    payload = draw(
        st.recursive(
            st.just(text),
            lambda inner: st.lists(inner, min_size=1, max_size=2) | st.dictionaries(st.text(max_size=3), inner, min_size=1, max_size=2),
            max_leaves=4,
        )
    )
    data = msgspec.json.encode({**draw(valid_envelopes), "payload": payload})
    return data.replace(msgspec.json.encode(_SPOT)[1:-1], draw(st.sampled_from(SPLICES)))


def assert_rejected_or_decoded_alike(roles: tuple[Master, Worker], data: bytes) -> bool:
    """Either the master rejects ``data`` with a reason, or the worker decodes the payload
    the master saw (and can encode it back as its result). True when it was accepted."""
    master, worker = roles
    try:
        accepted = master.validate(data, lambda: "generated-id")
    except Rejected as exc:
        assert str(exc).strip(), f"rejected without a reason: {data!r}"
        return False
    payload = worker_payload(worker, data)
    assert msgspec.json.encode(payload) == msgspec.json.encode(accepted.payload)
    return True


@BOUNDED
@given(data=encoded(valid_envelopes))
def test_every_valid_envelope_is_accepted_and_the_worker_gets_its_payload(roles: tuple[Master, Worker], data: bytes) -> None:
    sent = json.loads(data)
    if json_depth(sent.get("payload")) > MAX_PAYLOAD_DEPTH:
        with pytest.raises(Rejected, match="nest deeper"):
            roles[0].validate(data, lambda: "generated-id")
        return
    assert assert_rejected_or_decoded_alike(roles, data), "a valid envelope was rejected"
    assert worker_payload(roles[1], data) == sent.get("payload")


@settings(BOUNDED, max_examples=500)
@given(data=corrupted() | poisoned())
def test_a_corrupted_envelope_is_rejected_or_decoded_by_the_worker_as_the_master_saw_it(roles: tuple[Master, Worker], data: bytes) -> None:
    assert_rejected_or_decoded_alike(roles, data)


@settings(BOUNDED, max_examples=200)
@given(data=encoded(any_envelopes) | st.binary(max_size=300))
def test_whatever_the_bytes_the_master_rejects_them_or_the_worker_decodes_them(roles: tuple[Master, Worker], data: bytes) -> None:
    assert_rejected_or_decoded_alike(roles, data)


@BOUNDED
@given(value=json_values | st.integers(0, 3 * MAX_PAYLOAD_DEPTH).map(_nested), ascii_only=st.booleans())
def test_nesting_depth_is_exact_for_any_json(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    expected = json_depth(value)
    assert not nests_deeper_than(text, expected)
    assert nests_deeper_than(text, expected - 1)
