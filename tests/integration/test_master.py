"""The master against a real server: every kind of bad input is rejected with its reason
(never dropped, never fatal), and a submission without an id gets a stable generated one."""

from __future__ import annotations

import datetime
import re

import anyio
import msgspec
import pytest
from nats.js.errors import NotFoundError

from streamsched import subjects
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog import reader as eventlog
from streamsched.eventlog.state import StateStore
from streamsched.model import Status, derive_task_id
from streamsched.roles.master import Master
from streamsched.roles.projector import Projector
from streamsched.roles.regional import Regional
from streamsched.testing import EventLog, all_roles, running
from streamsched.transport import streams
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

#: A ULID-shaped id: 26 characters of Crockford's base32.
ULID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")

#: A valid envelope over the 1 KiB limit of the ``limited`` settings.
OVERSIZED = b'{"type": "echo", "payload": "' + b"x" * 2000 + b'"}'
#: ``(submission, a fragment its rejection reason must contain)``.
BAD_INPUTS = [
    (b"this is not json", "JSON is malformed"),
    (b"", "not a valid task envelope"),
    (b"[1, 2, 3]", "Expected `object`, got `array`"),
    (b'{"payload": {"to": "x"}}', "missing required field `type`"),
    (b'{"type": "echo", "priorty": "high"}', "unknown field `priorty`"),
    (b'{"type": "echo", "max_attempts": "three"}', "Expected `int | null`, got `str`"),
    (b'{"type": "echo", "priority": "urgent"}', "unknown priority 'urgent'"),
    (b'{"type": "echo", "id": "a.b"}', "id 'a.b' is not subject-safe"),
    (b'{"type": "echo", "id": "a b"}', "id 'a b' is not subject-safe"),
    (b'{"type": "two words"}', "type 'two words' is not a valid handler name"),
    (b'{"type": "echo", "region": "mars"}', "unknown region 'mars'"),
    (b'{"type": "echo", "max_attempts": 0}', "`max_attempts` must be between 1 and 100"),
    (b'{"type": "echo", "max_attempts": 101}', "`max_attempts` must be between 1 and 100"),
    (b'{"type": "echo", "timeout_s": -1}', "`timeout_s` must be positive"),
    (b'{"type": "echo", "depends_on": ["a.b"]}', "`depends_on` id 'a.b' is not subject-safe"),
    (b'{"type": "echo", "cron": "* * * * * *"}', "`cron` does not go on a task: make a schedule with `streamsched schedule add`"),
    (b'{"type": "echo", "run_at": "2030-01-01T09:00:00"}', "has no time zone"),
    (b'{"type": "echo", "run_at": "tomorrow"}', "`run_at` 'tomorrow' is not an RFC 3339 time"),
    (b'{"type": "echo", "delay_s": 1, "run_at": "2030-01-01T09:00:00Z"}', "give either `run_at` or `delay_s`, not both"),
    (b'{"type": "echo", "delay_s": -1}', "`delay_s` must be zero or more seconds"),
    (b'{"type": "echo", "deadline_s": 0}', "`deadline_s` must be more than zero seconds"),
    (OVERSIZED, f"is {len(OVERSIZED)} bytes, over the limit of 1024"),
]


@pytest.fixture
async def limited(settings: Settings, bus: Bus) -> Settings:
    """The test settings with a 1 KiB submission limit, applied to the streams."""
    small = msgspec.structs.replace(settings, max_payload_bytes=1024)
    await streams.apply(bus, small)
    return small


async def rejected_messages(bus: Bus) -> list:
    """Every message on ``tasks.rejected``, oldest first."""
    found, seq = [], 1
    while True:
        try:
            msg = await bus.js.get_msg(subjects.TASKS_STREAM, seq=seq, subject=subjects.REJECTED, next=True)
        except NotFoundError:
            return found
        found.append(msg)
        seq = msg.seq + 1


async def test_each_kind_of_bad_input_is_rejected_with_its_reason_and_the_master_keeps_serving(limited, bus, events: EventLog, examples):
    roles = await all_roles(limited, bus, examples)
    master = roles[0]
    async with running(roles):
        for data, _ in BAD_INPUTS:
            await bus.js.publish(subjects.SUBMIT, data)
        await bus.js.publish(subjects.SUBMIT, b'{"id": "still-fine", "type": "echo", "payload": "ok"}')
        final = await events.wait_final("still-fine")
        await events.wait_count("rejected", len(BAD_INPUTS))
        first = next(e for e in events.of_kind("rejected") if e.original == BAD_INPUTS[0][0])
        state = await Client(bus, await StateStore.open(bus)).wait(first.task_id, timeout_s=10)

    rejections = {e.original: e for e in events.of_kind("rejected")}
    on_subject = {m.data or b"": m for m in await rejected_messages(bus)}  # nats-py: empty body is None
    assert len(rejections) == len(on_subject) == len(BAD_INPUTS)
    for data, fragment in BAD_INPUTS:
        event = rejections[data]  # `original` is the bytes as sent
        assert fragment in event.reason, (data[:60], event.reason)
        assert ULID_RE.fullmatch(event.task_id)
        msg = on_subject[data]  # the body on tasks.rejected is the original bytes too
        assert msg.headers[subjects.H_REASON] == " ".join(event.reason.split())[:1024]
        assert msg.headers[subjects.H_TASK_ID] == event.task_id
    assert (state.status, state.error) == (Status.REJECTED, first.reason)

    assert events.kinds_of("still-fine") == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
    assert msgspec.json.decode(final.result) == "ok"
    assert (master.rejected, master.accepted) == (len(BAD_INPUTS), 1)
    assert not events.undecodable


async def test_a_task_without_an_id_gets_a_generated_id_that_survives_redelivery(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, b'{"type": "echo", "payload": 1}')
        await bus.js.publish(subjects.SUBMIT, b'{"type": "echo", "payload": 2}')
        await events.wait_count("succeeded", 2)
    first, second = [e.task_id for e in events.of_kind("submitted")]
    assert ULID_RE.fullmatch(first) and ULID_RE.fullmatch(second)
    assert first < second  # sortable in submission order

    # The id is derived from the submission's place in TASKS (time stored, sequence).
    stored = await bus.js.get_msg(subjects.TASKS_STREAM, seq=1)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    stored_ms = (stored.time - epoch) // datetime.timedelta(milliseconds=1)
    assert first == derive_task_id(stored_ms * 1_000_000, 1)

    # Make the master see both submissions again, as after a crash before its acks.
    await bus.js.delete_consumer(subjects.TASKS_STREAM, subjects.MASTER_CONSUMER)
    await streams.apply(bus, settings)
    again = Master(settings, bus)
    async with running([again, Regional(settings, bus, "default"), Projector(settings, bus, await StateStore.open(bus))]):
        await events.wait_count("submitted", 4)
        await events.wait(lambda log: len(log.of_kind("dispatched")) + len(log.of_kind("held")) == 4, what="4 released onto WORK")
        # The history is read from the messages the state notes: once the projector has noted the new ones.
        with anyio.fail_after(10):
            while "held" not in [r.kind for r in await eventlog.history(bus, first)]:
                await anyio.sleep(0.05)
    assert [e.task_id for e in events.of_kind("submitted")] == [first, second, first, second]
    assert again.accepted == 2
    # Same ids, same Nats-Msg-Id on WORK: the server dropped the second copies (handed to
    # the region in one batch, so SCHED's own msg id differed), nothing runs twice.
    assert (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == 0
    # Its steps were recorded again; the task's history shows each once.
    # (With no worker this time, the release was recorded as "held".)
    assert [r.kind for r in await eventlog.history(bus, first)] == ["submitted", "scheduled", "dispatched", "started", "succeeded", "held"]
    assert len(events.of_kind("started")) == 2


async def test_a_rejected_submission_with_a_usable_id_is_recorded_under_that_id(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, b'{"id": "mine-1", "type": "echo", "region": "mars"}')
        state = await Client(bus, await StateStore.open(bus)).wait("mine-1", timeout_s=10)
    assert state.status is Status.REJECTED and "unknown region 'mars'" in state.error
    assert [e.task_id for e in events.of_kind("rejected")] == ["mine-1"]
