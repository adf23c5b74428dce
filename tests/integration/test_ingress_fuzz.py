"""Bounded fuzzing of every input of the roles, running in one process against a real server.

5,000 malformed submissions (seeded, so a failure replays) go to ``tasks.submit``, with odd
headers on some, and garbage goes straight onto ``sched.*``, ``work.*`` and ``events.*``.
Every role must stay up and settle every message (nothing left to come back after
ack_wait), each stored submission must get exactly one ``rejected`` event, and good tasks
sent afterwards must all succeed, projected into KV.

How the expected count of rejections is exact: every submission is a JetStream publish
whose PubAck tells whether it was stored. Submissions that share a ``Nats-Msg-Id`` on
purpose are dropped by the server's dedupe (``duplicate`` in the PubAck), and one too large
for the TASKS stream is refused: neither reaches the master, so neither is expected.
Submissions whose JSON shows a usable id (a unique token) must be rejected under that id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog.state import StateStore
from streamsched.model import MAX_PAYLOAD_DEPTH, Status
from streamsched.testing import EventLog, all_roles, running, wait_drained
from streamsched.transport import streams
from streamsched.transport.bus import Bus

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SEED = 20_240_611
SUBMISSIONS = 5000
#: Publishes in flight at once: bounded, so a slow machine is not flooded.
WINDOW = 250
MAX_BYTES = 4096  # so oversized submissions stay small; TASKS takes messages up to 4x this

#: Invalid UTF-8: a stray continuation byte, an overlong "/", a surrogate, past U+10FFFF, cut short.
BAD_UTF8 = [b"\x80", b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]


@dataclass
class BadSubmission:
    body: bytes
    headers: dict[str, str] | bytes | None = None
    #: The id its rejection must be recorded under: its JSON is valid and shows this token.
    task_id: str | None = None


def envelope(uid: str, **fields: Any) -> bytes:
    return json.dumps({"type": "echo", "id": uid, "payload": {"n": 1}, **fields}).encode()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def malformed(rng: random.Random, uid: str) -> BadSubmission:
    """One bad submission of a kind drawn from ``rng``; ``uid`` is unique to it."""
    kind = rng.randrange(14)
    if kind == 0:  # random bytes
        return BadSubmission(rng.randbytes(rng.randrange(200)))
    if kind == 1:  # a valid envelope cut short: no proper prefix of an object is JSON
        whole = envelope(uid)
        return BadSubmission(whole[: rng.randrange(len(whole))])
    if kind == 2:  # JSON, but not an object
        return BadSubmission(rng.choice([b"[]", b'"echo"', b"42", b"null", b"true", b'[{"type":"echo"}]']))
    if kind == 3:  # a field of the wrong type
        name, value = rng.choice(
            [
                ("type", 5),
                ("priority", 1),
                ("labels", {"a": 1}),
                ("labels", ["a"]),
                ("max_attempts", "3"),
                ("max_attempts", 1.5),
                ("timeout_s", "soon"),
                ("region", 7),
                ("depends_on", "t1"),
            ]
        )
        return BadSubmission(envelope(uid, **{name: value}), task_id=uid)
    if kind == 4:  # unknown, unsupported or invalid fields (unknown names with control and non-ASCII characters)
        name, value = rng.choice(
            [
                ("priorty", "high"),
                ("p\u0001riority", "x"),
                ("\u00e9t\u00e9", 1),
                ("x\u2028y", 1),
                ("cron", "* * * * *"),
                ("priority", "urgent"),
                ("region", "mars"),
                ("max_attempts", 0),
                ("max_attempts", 101),
                ("timeout_s", -1),
                ("type", "two words"),
                ("type", ""),
                ("type", "x" * 300),
            ]
        )
        return BadSubmission(envelope(uid, **{name: value}), task_id=uid)
    if kind == 5:  # an id that is not a subject token: rejected under a derived id
        return BadSubmission(envelope(rng.choice(["a.b", "a b", "*", ">", "", "x" * 129, "\u00e9"])))
    if kind == 6:  # invalid UTF-8 in a string: of the payload, a label, the type or a key
        bad, token = rng.choice(BAD_UTF8), uid.encode()
        return BadSubmission(
            rng.choice(
                [
                    b'{"type":"echo","id":"%s","payload":"ok%sok"}' % (token, bad),
                    b'{"type":"echo","id":"%s","labels":{"a":"%s"}}' % (token, bad),
                    b'{"type":"ec%sho","id":"%s"}' % (bad, token),
                    b'{"type":"echo","id":"%s","payload":[{"k%s":1}]}' % (token, bad),
                ]
            )
        )
    if kind == 7:  # lone surrogate escapes
        return BadSubmission(b'{"type":"echo","id":"%s","payload":"%s"}' % (uid.encode(), rng.choice([b"\\ud800", b"\\udfff", b"\\ud800\\u0041"])))
    if kind == 8:  # numbers no decoder takes: literals that are not JSON, and ones out of range
        literal = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
        if rng.random() < 0.5:
            return BadSubmission(b'{"type":"echo","id":"%s","payload":%s}' % (uid.encode(), literal))
        number = rng.choice([b"1e400", b"-1e999", b"9" * 5000])
        return BadSubmission(b'{"type":"echo","id":"%s","payload":[%s]}' % (uid.encode(), number), task_id=uid)
    if kind == 9:  # nested too deep: a little, or far past Python's recursion limit
        depth = rng.randrange(MAX_PAYLOAD_DEPTH + 1, 4 * MAX_PAYLOAD_DEPTH)
        if rng.random() < 0.7:
            return BadSubmission(envelope(uid, payload=json.loads(_nested(depth))), task_id=uid)
        return BadSubmission(b'{"type":"echo","payload":' + (b"[" * 10_000 if rng.random() < 0.5 else _nested(5000).encode()) + b"}")
    if kind == 10:  # oversized, some far over
        return BadSubmission(envelope(uid, payload="x" * rng.randrange(MAX_BYTES, 3 * MAX_BYTES)), task_id=uid)
    if kind == 11:  # a byte order mark, or trailing bytes
        return BadSubmission(rng.choice([b"\xef\xbb\xbf" + envelope(uid), envelope(uid) + b" x", envelope(uid) + b"{}"]))
    if kind == 12:  # a duplicate key: the last one counts, and it is invalid
        return BadSubmission(b'{"type":"echo","id":"%s","type":"two words"}' % uid.encode(), task_id=uid)
    return BadSubmission(rng.randbytes(rng.randrange(1, 40)) + envelope(uid))  # garbage in front of JSON


def with_odd_headers(rng: random.Random, submission: BadSubmission, uid: str) -> BadSubmission:
    """Headers a client should not send; every ``Nats-Msg-Id`` here is unique to the submission."""
    submission.headers = rng.choice(
        [
            {subjects.H_MSG_ID: f"{uid} with spaces and \u00fcnic\u00f8de"},
            {subjects.H_MSG_ID: "x" * rng.randrange(500, 3000) + uid},
            {"X-Junk": "y" * rng.randrange(1000, 6000)},  # with the largest bodies, too large for TASKS
            {subjects.H_TASK_ID: "spoofed", subjects.H_TYPE: "echo", subjects.H_PRIORITY: "high"},
            b"NATS/1.0\r\nNats-Msg-Id: " + uid.encode() + b"\xff\xfe\r\nX-Bad: \x80\r\n\r\n",
        ]
    )
    return submission


def stream_garbage(rng: random.Random) -> list[tuple[str, bytes, bytes | None, str | None]]:
    """``(subject, body, raw header block, task id that must end failed)`` onto SCHED, WORK and EVENTS."""
    out: list[tuple[str, bytes, bytes | None, str | None]] = []
    for n in range(300):
        where = rng.choice(["sched", "work", "events"])
        priority = rng.choice(("high", "medium", "low"))
        if where == "events":
            subject = subjects.events(f"fuzz{n % 3}")
        else:  # onto WORK where a worker reads it: that of a type it handles
            subject = subjects.sched("default", priority) if where == "sched" else subjects.work("default", priority, "echo")
        if where == "events":
            body = rng.choice(
                [
                    rng.randbytes(rng.randrange(100)),
                    b"[" * 5000,
                    b'{"kind":"succeeded","task_id":"x","at":1,"result":' + b"[" * 5000 + b"}",
                    b'{"kind":"nope","task_id":"x","at":1}',
                    b'{"kind":"submitted","task_id":"a b","at":1,"type":"echo"}',
                    b'[{"kind":"started","task_id":"x","at":1,"v":99}]',
                    b'{"kind":"dispatched","task_id":"x","at":"soon"}',
                ]
            )
            out.append((subject, body, None, None))
            continue
        task_id = f"garbage-{n}"
        headers, must_fail = rng.choice(
            [
                (None, None),
                (b"NATS/1.0\r\nX-Other: 1\r\n\r\n", None),
                (b"NATS/1.0\r\n" + subjects.H_TASK_ID.encode() + b": \xff\xfe\r\n\r\n", None),  # not UTF-8: as if missing
                (b"NATS/1.0\r\n" + subjects.H_TASK_ID.encode() + b": " + task_id.encode(), None),  # unterminated block
                (f"NATS/1.0\r\n{subjects.H_TASK_ID}: {task_id}\r\n{subjects.H_TYPE}: echo\r\n\r\n".encode(), task_id),
                # An id that is no subject token, of a type nobody handles: terminated, never
                # dead-lettered (there is no dlq.<id> subject for it).
                (f"NATS/1.0\r\n{subjects.H_TASK_ID}: bad id {n}\r\n{subjects.H_TYPE}: no.such.type\r\n\r\n".encode(), None),
            ]
        )
        if where == "sched" and rng.random() < 0.2:  # a batch that is not one
            headers = f"NATS/1.0\r\n{subjects.H_BATCH}: 3\r\n\r\n".encode()
            must_fail = None
        body = rng.choice([rng.randbytes(rng.randrange(100)), b'{"type":"echo","payload":"\xff"}', b"[" * 5000, b""])
        out.append((subject, body or b"-", headers, must_fail))
    return out


async def publish_all(bus: Bus, messages: list[tuple[str, bytes, dict[str, str] | bytes | None]]) -> list[dict[str, Any] | BaseException]:
    """Publish in windows of :data:`WINDOW`; the PubAck (or error) of each message, in order."""
    results: list[dict[str, Any] | BaseException] = []
    for start in range(0, len(messages), WINDOW):
        futures = [await bus.publish(subject, body, headers) for subject, body, headers in messages[start : start + WINDOW]]
        results += await asyncio.gather(*futures, return_exceptions=True)
    return results


async def wait_settled(bus: Bus, stream: str, consumer: str, *, timeout_s: float) -> None:
    """Wait until ``consumer`` holds nothing unacknowledged and has nothing left to deliver."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await bus.js.consumer_info(stream, consumer)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{consumer} on {stream}: {info.num_ack_pending} unacknowledged, {info.num_pending} pending")
        await asyncio.sleep(0.1)


async def test_malformed_input_on_every_subject_is_rejected_or_dropped_and_every_role_keeps_serving(
    settings: Settings, bus: Bus, events: EventLog, examples, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    limited = msgspec.structs.replace(settings, max_payload_bytes=MAX_BYTES)
    await streams.apply(bus, limited)
    rng = random.Random(SEED)
    submissions = []
    for n in range(SUBMISSIONS):
        uid = f"fuzz-{n:05d}"
        submission = malformed(rng, uid)
        if rng.random() < 0.05:
            submission = with_odd_headers(rng, submission, uid)
        elif rng.random() < 0.02:  # the same Nats-Msg-Id as others: only the first of them is stored
            submission.headers = {subjects.H_MSG_ID: f"shared-{rng.randrange(10)}"}
        submissions.append(submission)
    garbage = stream_garbage(rng)

    roles = await all_roles(limited, bus, examples)
    master, _, projector, _ = roles
    began = time.monotonic()
    async with running(roles):
        sent = await publish_all(bus, [(subjects.SUBMIT, s.body, s.headers) for s in submissions])
        landed = await publish_all(bus, [(subject, body, headers) for subject, body, headers, _ in garbage])
        stored = [s for s, ack in zip(submissions, sent, strict=True) if isinstance(ack, dict) and not ack.get("duplicate")]
        shared = [
            s.headers[subjects.H_MSG_ID] for s in submissions if isinstance(s.headers, dict) and "shared" in s.headers.get(subjects.H_MSG_ID, "")
        ]
        refused = [ack for ack in sent if isinstance(ack, BaseException)]
        assert sum(1 for ack in sent if isinstance(ack, dict) and ack.get("duplicate")) == len(shared) - len(set(shared))
        assert all("maximum" in str(error) for error in refused), refused[:3]  # only the largest, with big headers
        assert all(isinstance(ack, dict) for ack in landed), "the streams refused some garbage"

        await events.wait_count("rejected", len(stored), timeout_s=40)
        must_fail = [task_id for *_, task_id in garbage if task_id is not None]
        for task_id in must_fail:
            assert (await events.wait_final(task_id, timeout_s=20)).__class__.__name__ == "Failed"

        good = [f"good-{n}" for n in range(50)]
        good_sent = await publish_all(bus, [(subjects.SUBMIT, envelope(task_id, payload={"n": n}), None) for n, task_id in enumerate(good)])
        assert all(isinstance(ack, dict) for ack in good_sent)
        client = Client(bus, await StateStore.open(bus))
        for n, task_id in enumerate(good):
            state = await client.wait(task_id, timeout_s=20)  # folded into KV by the projector
            assert state.status == Status.SUCCEEDED and msgspec.json.decode(state.result) == {"n": n}

        # Nothing was left to come back after ack_wait: every message was settled.
        await wait_drained(bus, subjects.SCHED_STREAM, timeout_s=10)
        await wait_drained(bus, subjects.WORK_STREAM, timeout_s=10)
        await wait_settled(bus, subjects.TASKS_STREAM, subjects.MASTER_CONSUMER, timeout_s=10)
        await wait_settled(bus, subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER, timeout_s=10)
    elapsed = time.monotonic() - began

    rejected = [e.task_id for e in events.of_kind("rejected")]
    assert len(rejected) == len(set(rejected)) == len(stored) == master.rejected
    assert {s.task_id for s in stored if s.task_id} <= set(rejected)
    assert master.accepted == len(good)
    assert projector.stats.skipped >= sum(1 for subject, *_ in garbage if subject.startswith("events."))
    # Garbage is logged as an error where it is dropped; an exception logged means a role
    # failed on a message, which would then come back after ack_wait, again and again.
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert not failures, [(r.name, r.getMessage()[:200], repr(r.exc_info[1])) for r in failures[:5]]
    assert elapsed < 60
