"""Envelope and submission decoding, ids, settings, and how the message structs sit with the garbage collector."""

from __future__ import annotations

import gc
import re
import sys

import msgspec
import pytest

from streamsched.client import new_task_id
from streamsched.config import Settings
from streamsched.errors import ConfigError, Rejected
from streamsched.eventlog import events as ev
from streamsched.model import (
    MAX_PAYLOAD_DEPTH,
    Envelope,
    Status,
    TaskState,
    decode_submission,
    derive_task_id,
    envelope_decoder,
    nests_deeper_than,
)
from streamsched.subjects import is_token


def test_a_minimal_envelope_gets_defaults_and_keeps_the_payload_raw():
    envelope = envelope_decoder.decode(b'{"type":"echo","payload":{"a":[1,2]}}')
    assert envelope.priority == "medium"
    assert envelope.id is None
    assert bytes(envelope.payload) == b'{"a":[1,2]}'


def test_an_unknown_field_is_refused_by_name():
    with pytest.raises(msgspec.ValidationError, match="priorty"):
        envelope_decoder.decode(b'{"type":"echo","priorty":"high"}')


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("depends_on", ["a"]),
        ("delay_s", 1.0),
        ("deadline_s", 5.0),
        ("split", {"parts": 2}),
        ("run_at", "2030-01-01T00:00:00Z"),
        ("idempotency_key", "k"),
    ],
)
def test_workflow_fields_are_part_of_the_envelope(field, value):
    envelope = envelope_decoder.decode(msgspec.json.encode({"type": "echo", field: value}))
    assert getattr(envelope, field) == value


def test_derived_ids_are_tokens_stable_and_sorted_by_time():
    first = derive_task_id(1_700_000_000_000_000_000, 7)
    assert first == derive_task_id(1_700_000_000_000_000_000, 7)
    assert len(first) == 26 and is_token(first)
    assert derive_task_id(1_700_000_000_001_000_000, 1) > first
    assert derive_task_id(1_700_000_000_000_000_000, 8) != first


def test_client_ids_are_unique_sortable_tokens():
    ids = [new_task_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 26 and is_token(i) for i in ids)


@pytest.mark.parametrize("bad", ["a.b", "a b", "a*", "", "x" * 129, "a>"])
def test_ids_that_would_break_subjects_are_not_tokens(bad):
    assert not is_token(bad)


def test_settings_come_from_the_environment_and_refuse_unknown_keys():
    settings = Settings.load({"NATS_URL": "nats://h:1", "STREAMSCHED_REGIONS": "eu, us", "STREAMSCHED_ACK_WAIT_S": "5"})
    assert (settings.nats_url, settings.regions, settings.ack_wait_s) == ("nats://h:1", ("eu", "us"), 5.0)
    with pytest.raises(ConfigError, match="STREAMSCHED_REGOINS"):
        Settings.load({"STREAMSCHED_REGOINS": "eu"})
    with pytest.raises(ConfigError, match="not a valid region"):
        Settings.load({}, regions=("e.u",))
    with pytest.raises(ConfigError, match="projector_nice must be 0 to 19"):
        Settings.load({"STREAMSCHED_PROJECTOR_NICE": "20"})
    # The wire switch is the transport's, read by each connection: allowed beside the settings.
    assert Settings.load({"STREAMSCHED_WIRE": "nats-py"}) == Settings.load({})
    with pytest.raises(ConfigError, match="STREAMSCHED_WIRE must be one of fast, nats-py, not 'turbo'"):
        Settings.load({"STREAMSCHED_WIRE": "turbo"})


def test_explicit_overrides_win_and_none_means_not_given():
    settings = Settings.load({"STREAMSCHED_REGIONS": "eu"}, regions=None, grace_s=3)
    assert settings.regions == ("eu",)
    assert settings.grace_s == 3.0


def test_message_structs_are_not_tracked_by_the_cyclic_collector() -> None:
    """The projector caches tens of thousands of states; tracked, every full collection walks them."""
    samples = [
        TaskState(id="t1", status=Status.PENDING, labels={"team": "a"}),
        ev.Submitted(task_id="t1", at=1.0, type="echo", priority="high", labels={"team": "a"}),
        ev.Succeeded(task_id="t1", at=2.0, result=None),
        Envelope(type="echo", labels={"team": "a"}),
    ]
    assert [gc.is_tracked(sample) for sample in samples] == [False] * len(samples)


def _submission(payload: bytes, **fields: str) -> bytes:
    extra = b"".join(b',"%s":"%s"' % (name.encode(), value.encode()) for name, value in fields.items())
    return b'{"type":"echo"' + extra + b',"payload":' + payload + b"}"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_submission(b'"\xff\xfe"'), "Invalid UTF-8"),
        (_submission(b'"\xed\xa0\x80"'), "Invalid UTF-8"),  # a surrogate, encoded as UTF-8
        (_submission(b'"\xc0\xaf"'), "Invalid UTF-8"),  # an overlong encoding of "/"
        (_submission(b'{"k":["ok","\xf4\x90\x80\x80"]}'), "Invalid UTF-8"),  # past U+10FFFF, deep in the payload
        (b'{"type":"echo","labels":{"team":"\xff"}}', "Invalid UTF-8"),
        (b'{"type":"ec\xffho"}', "Invalid UTF-8"),
        (_submission(b'"\\ud800"'), "truncated"),  # a lone high surrogate escape
        (_submission(b'"\\udc00"'), "invalid utf-16 surrogate pair"),
        (_submission(b"NaN"), "JSON is malformed"),
        (_submission(b"-Infinity"), "JSON is malformed"),
        (_submission(b"1e400"), "Number out of range"),
        (b'{"type":"echo","payload":[1,2', "truncated"),
        (b'\xef\xbb\xbf{"type":"echo"}', "JSON is malformed"),  # a byte order mark
        (b'{"type":"echo"} {}', "trailing characters"),
        (b'"echo"', "Expected `object`, got `str`"),
        (b"null", "Expected `object`, got `null`"),
        (b'{"type":"echo","max_attempts":"3"}', "Expected `int | null`, got `str`"),
        (_submission(_nested(MAX_PAYLOAD_DEPTH + 1)), f"nest deeper than {MAX_PAYLOAD_DEPTH} levels"),
        (_submission(_nested(100_000)), f"nest deeper than {MAX_PAYLOAD_DEPTH} levels"),
        (_submission(b"[" * 100_000), f"nest deeper than {MAX_PAYLOAD_DEPTH} levels"),  # unbalanced, too
    ],
)
def test_a_submission_the_worker_could_not_decode_is_rejected_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=re.escape(reason)):
        decode_submission(data)


def test_the_payload_is_decoded_once_and_handed_over_as_its_json_value() -> None:
    submission = decode_submission(_submission(b'{"a":[1,2.5,"\\ud83d\\ude00",null]}'))
    assert submission.payload == {"a": [1, 2.5, "\N{GRINNING FACE}", None]}
    assert decode_submission(b'{"type":"echo"}').payload is None


def test_leniencies_of_json_that_every_decoder_shares_are_accepted() -> None:
    # Duplicate keys: the last one wins (as in Python's json and msgspec alike).
    assert decode_submission(b'{"type":"x","type":"echo","payload":{"a":1,"a":2}}').payload == {"a": 2}
    assert decode_submission(b' {"type":"echo"} \n').type == "echo"
    assert decode_submission(_submission(b"1" * 300)).payload == int("1" * 300)


def test_the_depth_limit_counts_arrays_and_objects_in_the_payload_but_not_brackets_in_strings() -> None:
    deepest = b'{"a":' * (MAX_PAYLOAD_DEPTH - 1) + b'["[[[{\\"\\\\"]' + b"}" * (MAX_PAYLOAD_DEPTH - 1)
    assert decode_submission(_submission(deepest)).payload is not None
    with pytest.raises(Rejected, match="nest deeper"):
        decode_submission(_submission(b"[" + deepest + b"]"))


def test_a_payload_at_the_depth_limit_decodes_however_deep_the_callers_stack_already_is() -> None:
    """Python's recursion limit alone would make this depend on where the decode is called from."""
    data = _submission(_nested(MAX_PAYLOAD_DEPTH))

    def decode_at(frames: int) -> object:
        return decode_submission(data).payload if frames == 0 else decode_at(frames - 1)

    assert decode_at(sys.getrecursionlimit() - MAX_PAYLOAD_DEPTH - 150) == decode_submission(data).payload


def test_a_rejection_keeps_the_submitters_id_when_the_json_still_shows_a_usable_one() -> None:
    with pytest.raises(Rejected) as bad_payload:
        decode_submission(_submission(b'"\xff"', id="order-1"))
    assert bad_payload.value.task_id == "order-1"
    with pytest.raises(Rejected) as too_deep:
        decode_submission(_submission(_nested(MAX_PAYLOAD_DEPTH + 1), id="order-2"))
    assert too_deep.value.task_id == "order-2"
    with pytest.raises(Rejected) as oversized:
        decode_submission(big := _submission(b'"' + b"x" * 100 + b'"', id="order-3"), max_bytes=64)
    assert (oversized.value.task_id, str(oversized.value)) == ("order-3", f"submission is {len(big)} bytes, over the limit of 64")
    for unusable in (_submission(b'"\xff"', id="a.b"), b'{"id":"order-4"', b'{"type":"echo","id":5}'):
        with pytest.raises(Rejected) as rejected:
            decode_submission(unusable)
        assert rejected.value.task_id is None


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b'"[{"', 0),
        (b"[]", 1),
        (b'{"a":[{"b":"]]"},[]]}', 3),
        (b'["\\\\",["\\"[",[]]]', 3),
        (b'["\\n\\"]\\\\",[["\\u005b\\/{"]]]', 3),  # escapes of every kind before brackets in strings
        (b"[[[", 3),  # unbalanced: as deep as a decoder would get
        (b'["\\"[[', 1),  # an unterminated string: its brackets are text to a decoder too
    ],
)
def test_nesting_is_measured_like_a_decoder_descends(text: bytes, depth: int) -> None:
    assert (nests_deeper_than(text, depth - 1), nests_deeper_than(text, depth)) == (True, False)
