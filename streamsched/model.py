"""The task envelope and the task state, as typed msgspec records.

Schema evolution rules:

* New fields are added with a default, so old producers stay valid.
* Unknown fields are refused: a typo such as ``"priorty"`` must not silently run a
  task with the wrong meaning.
* ``payload`` and ``result`` are kept as raw JSON (:class:`msgspec.Raw`): hops forward
  them untouched and only the handler (or the reader) decodes them.

The master and the worker read a submission with one function, :func:`decode_submission`,
so whatever the master accepts the worker can decode: every byte of it, the payload too.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgspec

from .errors import Rejected
from .subjects import is_token

#: Raw JSON bytes, or absent. (msgspec cannot put ``Raw`` in a union with ``None``,
#: nor render a ``Raw`` default in a JSON Schema; ``UNSET`` does both.)
MaybeRaw = msgspec.Raw | msgspec.UnsetType


def raw_value(raw: MaybeRaw) -> Any:
    """The decoded JSON of a raw field; ``None`` when it is absent."""
    return None if raw is msgspec.UNSET else msgspec.json.decode(raw)


#: Priority levels, highest first. Each is its own subject and durable consumer.
PRIORITIES: tuple[str, ...] = ("high", "medium", "low")
DEFAULT_PRIORITY = "medium"
#: What a task pinned to a region that has no live scheduler or worker does (``region_failover``):
#: wait there, or go to any healthy region.
REGION_FAILOVER: tuple[str, ...] = ("wait", "any")


#: What a concurrency, rate or fairness key may be: visible ASCII without spaces (it travels in a header).
LIMIT_KEY_RE = re.compile(r"[!-~]{1,200}")
LIMIT_KEY_RULE = "1-200 visible ASCII characters, no spaces"
#: Most slots one concurrency key may have.
MAX_CONCURRENCY_LIMIT = 1000


class Status(enum.StrEnum):
    """Where a task is in its life; the ``status`` field of the KV projection."""

    PENDING = "pending"
    WAITING = "waiting"
    """Held back until a time (``run_at``, ``delay_s``) or until its dependencies succeeded."""
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    DEAD = "dead"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.DEAD, Status.REJECTED, Status.CANCELLED})


# gc=False on the structs of every message (here and in events.py): built from JSON, they
# cannot hold a reference cycle, and the projector keeps tens of thousands of them cached, which
# Python's cyclic collector would otherwise walk on every full collection.
class Envelope(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A task as submitted to ``tasks.submit`` (JSON)."""

    type: str
    """Handler name, e.g. ``email.send``."""
    id: str | None = None
    """Subject-safe token, also the dedupe key; generated (time-sortable) when missing."""
    payload: MaybeRaw = msgspec.UNSET
    """Handler input, any JSON (absent means ``null``); forwarded as raw bytes."""
    priority: str = DEFAULT_PRIORITY
    """One of :data:`PRIORITIES`."""
    region: str | None = None
    """Region affinity; the master chooses when missing."""
    region_failover: str | None = None
    """When ``region`` has no live regional scheduler or worker: ``wait`` there, or go to
    ``any`` healthy region (default: the ``region_failover`` setting)."""
    timeout_s: float | None = None
    """Per-attempt time limit in seconds; the handler's default when missing."""
    max_attempts: int | None = None
    """Attempts before the task is dead-lettered; the handler's default when missing."""
    labels: dict[str, str] = {}
    """Free-form labels, kept in the task state."""
    depends_on: list[str] = []
    """Ids of tasks that must succeed before this one starts (they may be submitted later)."""
    dependency_timeout_s: float | None = None
    """Longest wait for the dependencies; past it the task is cancelled (default: the setting)."""
    on_dependency_failure: str = "cancel"
    """``cancel`` this task when a dependency fails, is dead or cancelled, or ``run`` it anyway."""
    run_at: str | None = None
    """Start no earlier than this time (RFC 3339)."""
    delay_s: float | None = None
    """Start no earlier than this many seconds after submission."""
    deadline: str | None = None
    """No attempt starts after this time (RFC 3339); the task then ends ``dead``."""
    deadline_s: float | None = None
    """``deadline`` as seconds after submission."""
    cron: str | None = None
    """Refused on a task: recurring tasks are schedules (``streamsched schedule add``)."""
    split: dict[str, Any] | None = None
    """Fan out into chunk tasks, gathered in chunk order: ``{"chunks": [payload, ...]}`` or
    ``{"range": [start, stop], "parts": N}``, optionally with ``"gather": "<type>"``
    (see :mod:`streamsched.roles.splits`)."""
    idempotency_key: str | None = None
    """Another submission with this key within ``idempotency_ttl_s`` stands for the first task."""
    concurrency_key: str | None = None
    """At most ``concurrency_limit`` tasks with this key are admitted and unfinished at once,
    across the cluster; the rest wait, using no worker slot and no attempt."""
    concurrency_limit: int | None = None
    """The limit of ``concurrency_key`` (default: the ``concurrency_limits`` setting for the key)."""
    rate_key: str | None = None
    """The rate limit the task draws on (a name in the ``rate_limits`` setting); without it,
    the one named after its type, if set."""
    fairness_key: str | None = None
    """A tenant (or any label): the tasks of each fairness key share their queue by the
    ``fairness_weights`` setting, so one key's flood does not hold another key's tasks back."""
    dependency_results: dict[str, Any] | None = None
    """Filled in by the scheduler when a task with ``depends_on`` is released: the result of
    each dependency by id (``null`` for one that did not succeed). A worker in another language
    reads it from the task JSON it receives; a submitter may not set it."""


class TaskState(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The latest state of one task: the value of KV ``tasks.<id>``."""

    id: str
    status: Status
    type: str | None = None
    priority: str | None = None
    region: str | None = None
    attempts: int = 0
    """Attempts started so far."""
    result: MaybeRaw = msgspec.UNSET
    """The handler's return value as raw JSON (absent until it succeeds)."""
    error: str | None = None
    worker: str | None = None
    progress: float | None = None
    """Last reported progress of the running attempt (0..1)."""
    progress_message: str | None = None
    stranded: str | None = None
    """Why it waits in its region although queued: the region has no live regional scheduler
    or worker (recorded by the master as it queued it; cleared once an attempt starts)."""
    rerouted: str | None = None
    """Why it runs in another region than the one it named (``region_failover: any``)."""
    waiting_on: list[str] = []
    """While ``waiting``: the dependencies it waits for (as recorded when it began to wait)."""
    not_before: float | None = None
    """While ``waiting``: the time it is held until (``run_at``, ``delay_s``)."""
    waiting_reason: str | None = None
    """Why it waited on WORK, when it did (no live worker of its region handles its type)."""
    labels: dict[str, str] = {}
    submitted_at: float | None = None
    scheduled_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    priority_changed_at: float | None = None
    """When the priority was last changed by a ``reprioritized`` event."""
    rank: int = 0
    event_seqs: list[int] = []
    """EVENTS sequences of the messages that hold the task's events (the first
    :data:`~streamsched.eventlog.state.MAX_EVENT_SEQS`), so its history is read by sequence
    instead of by scanning the stream."""
    """Order of the last event folded in; a lower-ranked event never overwrites it."""


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def derive_task_id(stored_at_ns: int, stream_seq: int) -> str:
    """A ULID-shaped id (26 chars, sortable by time) for a submission that has none.

    It is derived from the submission's place in the TASKS stream rather than drawn at
    random, so a master that crashes before acking and sees the message again gives it
    the same id, and the downstream dedupe drops the second copy.
    """
    return _base32(stored_at_ns // 1_000_000, 10) + _base32(stream_seq, 16)


class Submission(Envelope, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An envelope as the master checks it and the worker runs it: the payload decoded.

    Decoding the payload in the master too is what makes it complete: a payload skipped
    as raw JSON is not checked for invalid UTF-8 or out-of-range numbers, which only the
    worker's decode would then find. One pass into Python values also costs less than a
    raw skip followed by a second decode of the payload.
    """

    payload: Any = None


#: Deepest nesting of arrays and objects in a payload. A JSON decoder recurses once per level
#: and stops at Python's recursion limit, whose headroom depends on how deep the caller's stack
#: already is: without a limit of its own, the master could accept a payload that the worker
#: fails to decode. 100 is Ruby's default limit; real payloads stay far below it.
MAX_PAYLOAD_DEPTH = 100
#: The same limit over the whole submission, whose own object is one level more.
_MAX_NESTING = MAX_PAYLOAD_DEPTH + 1
#: :func:`nests_deeper_than` keeps only the bytes that shape the nesting, brackets as ``[]``...
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))
_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
#: ... and, in a document with escapes, backslashes and what may follow one (as ``e``, but
#: for ``"`` and ``\``): each escape then stays a pair, and the rest of the text is gone.
_ESCAPABLE = b"/bfnrtu"
_NOT_STRUCTURE_OR_ESCAPE = bytes(sorted(set(_NOT_STRUCTURE) - set(b"\\" + _ESCAPABLE)))
_AS_BRACKETS_OR_ESCAPE = bytes.maketrans(b"{}" + _ESCAPABLE, b"[]" + b"e" * len(_ESCAPABLE))


def nests_deeper_than(data: bytes, limit: int) -> bool:
    """True when arrays and objects in ``data`` nest deeper than ``limit``.

    Exact for valid JSON; for any other input it counts at least as deep as a decoder gets
    before it finds the error. Every step runs in C (about 16 µs for 10 KB of small objects):
    every byte but quotes and brackets goes (escapes first kept, then dropped with the quotes
    they hide), then the strings. Removing every innermost ``[]`` pair lowers the depth by
    one; what no pass can shorten is unbalanced, and each ``[`` left in it may open one
    more level.
    """
    if b"\\" in data:
        skeleton = data.translate(_AS_BRACKETS_OR_ESCAPE, _NOT_STRUCTURE_OR_ESCAPE)
        skeleton = skeleton.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, b"\\e")
    else:
        skeleton = data.translate(_AS_BRACKETS, _NOT_STRUCTURE)
    # Two adjacent quotes have nothing between them: dropping them leaves every other byte on
    # its side of a string, and leaves quotes only around strings that hold brackets.
    skeleton = skeleton.replace(b'""', b"")
    if b'"' in skeleton:
        skeleton = b"".join(skeleton.split(b'"')[::2])
    for depth in range(limit + 1):
        inner = skeleton.replace(b"[]", b"")
        if len(inner) == len(skeleton):
            return depth + skeleton.count(b"[") > limit
        skeleton = inner
    return True


class _SubmitterId(msgspec.Struct, gc=False):
    id: str | None = None


def _rejected(reason: str, data: bytes) -> Rejected:
    """A rejection under the submitter's id when the JSON still shows a usable one, so they
    can look up why even when the rest of the envelope is broken."""
    rejected = Rejected(reason)
    try:
        task_id = _submitter_id_decoder.decode(data).id
    except (msgspec.DecodeError, RecursionError):
        return rejected
    if task_id is not None and is_token(task_id):
        rejected.task_id = task_id
    return rejected


def decode_submission(data: bytes, *, max_bytes: int | None = None) -> Submission:
    """The submission in ``data``, fully decoded; raises :class:`Rejected` with the reason.

    Refused: more than ``max_bytes`` (when given), anything but one JSON object (a BOM,
    trailing bytes, ``NaN``, invalid UTF-8 or a lone surrogate escape anywhere, numbers out
    of range), a field of the wrong type or unknown, arrays and objects nested deeper than
    :data:`MAX_PAYLOAD_DEPTH` in the payload. Duplicate keys are not an error: the last one wins.
    Field values (priority, region, id...) are the master's to check.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise _rejected(f"submission is {len(data)} bytes, over the limit of {max_bytes}", data)
    # A document cannot nest deeper than it has opening brackets (nor than half its length):
    # counting them is cheaper than the exact check, which most submissions never need.
    if len(data) > 2 * _MAX_NESTING and data.count(b"[") + data.count(b"{") > _MAX_NESTING and nests_deeper_than(data, _MAX_NESTING):
        raise _rejected(f"not a valid task envelope: arrays and objects nest deeper than {MAX_PAYLOAD_DEPTH} levels", data)
    try:
        return _submission_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _rejected(f"not a valid task envelope: {exc}", data) from None


encode = msgspec.json.Encoder().encode
envelope_decoder = msgspec.json.Decoder(Envelope)
state_decoder = msgspec.json.Decoder(TaskState)
_submission_decoder = msgspec.json.Decoder(Submission)
_submitter_id_decoder = msgspec.json.Decoder(_SubmitterId)
