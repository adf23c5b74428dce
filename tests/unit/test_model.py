"""Envelope decoding, ids, settings, and how the message structs sit with the garbage collector."""

from __future__ import annotations

import gc

import msgspec
import pytest

from streamsched.client import new_task_id
from streamsched.config import Settings
from streamsched.errors import ConfigError
from streamsched.eventlog import events as ev
from streamsched.model import (
    UNSUPPORTED_FIELDS,
    Envelope,
    Status,
    TaskState,
    derive_task_id,
    envelope_decoder,
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


@pytest.mark.parametrize("field", UNSUPPORTED_FIELDS)
def test_fields_of_later_features_are_not_refused_as_unknown(field):
    value = {"depends_on": ["a"], "delay_s": 1.0, "split": {"n": 2}}.get(field, "x")
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
