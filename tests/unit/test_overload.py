"""Overload vocabulary: which JetStream errors mean "a stream is full", the message that names
the limit, the backoff's budget, and that every stream holding tasks refuses rather than
evicts. (Against a real server with tiny limits: tests/integration/test_overload.py.)"""

from __future__ import annotations

import time

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DiscardPolicy
from nats.js.errors import APIError, BadRequestError, ServerError, ServiceUnavailableError

from streamsched import subjects
from streamsched.config import Settings
from streamsched.errors import SERVER_STORAGE, ConfigError, Overloaded, StreamschedError
from streamsched.transport import overload, streams
from streamsched.transport.bus import explain


def refusal(err_code: int, description: str) -> APIError:
    """An error as nats-py raises it for a PubAck carrying that error (status 503)."""
    return ServiceUnavailableError(code=503, err_code=err_code, description=description)


@pytest.mark.parametrize(
    ("description", "limit"),
    [
        ("maximum bytes exceeded", "max_bytes"),
        ("maximum messages exceeded", "max_msgs"),
        ("maximum messages per subject exceeded", "max_msgs_per_subject"),
    ],
)
def test_each_stream_limit_refusal_is_recognised_with_the_field_that_set_it(description, limit):
    assert overload.refused_at(refusal(10077, description)) == limit
    assert overload.is_full(refusal(10077, description))


def test_full_server_storage_is_recognised_whatever_the_stream():
    assert overload.refused_at(refusal(10023, "insufficient resources")) == SERVER_STORAGE


@pytest.mark.parametrize(
    "error",
    [
        refusal(10077, "store closed"),  # the same code for a store failing otherwise: not a full stream
        BadRequestError(code=400, err_code=10054, description="message size exceeds maximum allowed"),
        BadRequestError(code=400, err_code=10071, description="wrong last sequence: 3"),
        ServerError(code=500, err_code=10047, description="insufficient storage resources available"),  # a stream create
        NatsTimeoutError(),
        ConnectionError("lost"),
        None,
    ],
)
def test_other_errors_are_not_taken_for_a_full_stream(error):
    assert not overload.is_full(error)


def test_the_message_names_the_stream_the_limit_and_the_setting():
    exc = Overloaded("TASKS", "max_bytes", value=1073741824, setting="tasks_max_bytes")
    assert str(exc) == "stream TASKS is full: max_bytes 1073741824 (tasks_max_bytes)"
    assert isinstance(exc, StreamschedError)
    assert (exc.stream, exc.limit, exc.value, exc.setting) == ("TASKS", "max_bytes", 1073741824, "tasks_max_bytes")
    detailed = Overloaded("WORK", "max_bytes", value=4096, setting="queue_max_bytes", detail="not retried")
    assert str(detailed) == "stream WORK is full: max_bytes 4096 (queue_max_bytes); not retried"


def test_the_message_says_what_it_could_not_look_up():
    assert str(Overloaded(None, "max_msgs")) == "a stream is full: max_msgs"
    assert str(Overloaded("X", "max_msgs", value=2)) == "stream X is full: max_msgs 2"
    storage = str(Overloaded("TASKS", SERVER_STORAGE))
    assert storage.startswith("the server's JetStream storage is full") and storage.endswith("stream TASKS cannot grow")
    assert "stream" not in str(Overloaded(None, SERVER_STORAGE)).split(":")[-1]


def test_a_jetstream_error_is_explained_with_its_code_and_description():
    assert explain(refusal(10077, "maximum bytes exceeded")) == "ServiceUnavailableError 10077: maximum bytes exceeded"
    assert repr(refusal(10077, "maximum bytes exceeded")) == "ServiceUnavailableError()"  # why explain() exists
    assert explain(ConnectionError("lost")) == "ConnectionError('lost')"


def test_each_named_setting_is_the_one_that_sets_that_limit():
    distinct = Settings.load({}, tasks_max_bytes=1111, queue_max_bytes=2222, events_max_bytes=3333, dlq_max_bytes=4444, state_max_bytes=5555)
    configs = {config.name: config for config in streams.stream_configs(distinct)}
    configs[f"KV_{subjects.STATE_BUCKET}"] = streams.kv_config(distinct)  # its max_bytes is the bucket's
    for (stream, limit), setting in streams.LIMIT_SETTINGS.items():
        assert getattr(configs[stream], limit) == getattr(distinct, setting), (stream, limit)


def test_every_stream_that_refuses_at_a_limit_has_its_setting_named():
    for config in streams.stream_configs(Settings()):
        if config.discard == DiscardPolicy.NEW and (config.max_bytes or -1) > 0:
            assert (config.name, "max_bytes") in streams.LIMIT_SETTINGS


def test_every_stream_that_holds_tasks_refuses_new_messages_rather_than_evicting_old_ones():
    configs = {config.name: config for config in streams.stream_configs(Settings())}
    for name in (subjects.TASKS_STREAM, subjects.SCHED_STREAM, subjects.WORK_STREAM, subjects.FINISHED_STREAM):
        assert configs[name].discard == DiscardPolicy.NEW, name
    # TIMERS holds delayed tasks and discards old ones (nats-server refuses schedules otherwise): it has no limit to reach.
    timers = configs[subjects.TIMERS_STREAM]
    assert timers.discard == DiscardPolicy.OLD and (timers.max_bytes or -1) <= 0 and (timers.max_msgs or -1) <= 0


def test_the_retry_budget_may_be_zero_but_not_negative():
    assert Settings.load({}, submit_retry_budget_s=0).submit_retry_budget_s == 0
    assert Settings.load({"STREAMSCHED_SUBMIT_RETRY_BUDGET_S": "2.5"}).submit_retry_budget_s == 2.5
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigError, match="submit_retry_budget_s"):
            Settings.load({}, submit_retry_budget_s=bad)


@pytest.mark.anyio
async def test_a_spent_budget_stops_at_once_and_a_zero_budget_never_waits():
    backoff = overload.Backoff(0.0)
    began = time.monotonic()
    assert not await backoff.wait()
    assert time.monotonic() - began < 0.05
    assert backoff.spent() == "not retried (submit_retry_budget_s is 0)"


@pytest.mark.anyio
async def test_the_pauses_double_with_jitter_and_the_last_try_comes_at_the_budget():
    budget = 0.6
    backoff = overload.Backoff(budget)
    pauses: list[float] = []
    while True:
        before = time.monotonic()
        if not await backoff.wait():
            break
        pauses.append(time.monotonic() - before)
        assert len(pauses) < 50
    assert budget - 0.01 <= backoff.elapsed_s < budget + 0.25
    *whole, last = pauses  # the last is cut short by the deadline
    assert len(whole) >= 3
    for n, pause in enumerate(whole):
        ceiling = min(overload.FIRST_DELAY_S * 2**n, overload.MAX_DELAY_S)
        assert ceiling / 2 - 0.005 <= pause <= ceiling + 0.1, (n, pause)  # half to all of it: jitter
    assert last <= min(overload.FIRST_DELAY_S * 2 ** len(whole), overload.MAX_DELAY_S) + 0.1
    assert "s of retries (submit_retry_budget_s)" in backoff.spent()
