"""Concurrency keys, rate limits and fair shares: which limits a task is under, the lane it
waits in, and the KV ``limits`` entries that enforce them across the cluster.

A task under a limit is not released onto WORK by its regional scheduler. It is parked on
``held.<priority>.<lane>`` in SCHED (its ``held`` event says what it waits for), where it
uses no worker slot and no attempt, and :mod:`streamsched.roles.admission` moves it onto
WORK once every limit lets it. A lane holds the tasks of one region, type and priority under
the same limits, oldest first.

* ``concurrency_key`` K with limit N (the task's ``concurrency_limit``, else the
  ``concurrency_limits`` setting): slots ``c.<digest of K>.0`` to ``N-1`` in KV ``limits``.
  An admitted task holds one (its value is the task id) from its admission to its outcome,
  retries included, and the worker that records the outcome deletes it. A KV create
  succeeds once per key, so at most N tasks of K are admitted and unfinished at once,
  whichever regional schedulers admitted them and workers run them.
* A rate limit (``rate_limits[rate_key]``, else ``rate_limits[type]``, in tasks per second):
  a token bucket ``r.<digest>`` updated by compare-and-set, holding at most
  :data:`RATE_BURST_S` seconds' worth of tokens (at least one).
* ``fairness_key`` F: the tasks of every fairness key share their WORK subject (region,
  priority and type) fairly. Admission keeps at most ``fairness_window`` of them queued
  there undelivered (the WORK durable's ``num_pending``) and draws the lanes by lottery
  weighted by ``fairness_weights[F]`` (default 1): a key with a flood parked gets its share
  of the room and no more, and a task of another key waits behind at most about a window's
  worth of work.

A slot whose task finished but was not deleted (its worker died between the outcome and the
delete) is swept by admission, which looks up the states of the slots' tasks now and then.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import NamedTuple

import msgspec
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from .. import subjects
from ..config import Settings
from ..errors import Rejected
from ..eventlog.state import WRONG_LAST_SEQUENCE
from ..model import LIMIT_KEY_RE, LIMIT_KEY_RULE, MAX_CONCURRENCY_LIMIT, Envelope
from ..transport import direct, wire
from ..transport.bus import Bus
from ..transport.kv_watch import bucket_values

log = logging.getLogger("streamsched.limits")

#: A rate limit's bucket holds at most this many seconds' worth of tokens (and at least one):
#: enough to catch up after an admission pass that woke late, not a burst.
RATE_BURST_S = 0.1


def check(envelope: Envelope, settings: Settings) -> None:
    """The master's checks of a task's limits; raises :class:`Rejected` with the reason."""
    for field in ("concurrency_key", "rate_key", "fairness_key"):
        value = getattr(envelope, field)
        if value is not None and not LIMIT_KEY_RE.fullmatch(value):
            raise Rejected(f"`{field}` {value!r} is not valid ({LIMIT_KEY_RULE})")
    key, limit = envelope.concurrency_key, envelope.concurrency_limit
    if limit is not None:
        if key is None:
            raise Rejected("`concurrency_limit` needs a `concurrency_key`")
        if not 1 <= limit <= MAX_CONCURRENCY_LIMIT:
            raise Rejected(f"`concurrency_limit` must be between 1 and {MAX_CONCURRENCY_LIMIT}")
    elif key is not None and key not in settings.concurrency_limits:
        raise Rejected(f"concurrency key {key!r} has no limit: give `concurrency_limit`, or set one in the concurrency_limits setting")
    if envelope.rate_key is not None and envelope.rate_key not in settings.rate_limits:
        known = ", ".join(sorted(settings.rate_limits)) or "none set"
        raise Rejected(f"rate key {envelope.rate_key!r} names no rate limit (rate_limits: {known})")


def header_value(envelope: Envelope) -> str | None:
    """The :data:`~streamsched.subjects.H_LIMITS` header of a task: its limits as ``name=value``
    words (``c`` concurrency key, ``n`` its limit, ``r`` rate key, ``f`` fairness key), or
    None when it names none (a few attribute reads: the master asks for every task)."""
    if envelope.concurrency_key is None and envelope.rate_key is None and envelope.fairness_key is None:
        return None
    words = []
    if envelope.concurrency_key is not None:
        words.append(f"c={envelope.concurrency_key}")
        if envelope.concurrency_limit is not None:
            words.append(f"n={envelope.concurrency_limit}")
    if envelope.rate_key is not None:
        words.append(f"r={envelope.rate_key}")
    if envelope.fairness_key is not None:
        words.append(f"f={envelope.fairness_key}")
    return " ".join(words)


def parse_header(value: str) -> dict[str, str]:
    """The words of a :data:`~streamsched.subjects.H_LIMITS` header by name (unknown ones kept, ignored)."""
    return dict(word.split("=", 1) for word in value.split() if "=" in word)


def _digest(*parts: str, size: int = 8) -> str:
    return hashlib.blake2s("\0".join(parts).encode(), digest_size=size).hexdigest()


class SlotSet(NamedTuple):
    """A concurrency key's slots, ``<prefix>.0`` to ``<prefix>.<limit - 1>`` in KV ``limits``:
    one per admitted, unfinished task."""

    prefix: str
    limit: int
    key: str


class Gates(NamedTuple):
    """What a lane's tasks wait for, as the settings of the scheduler admitting them say."""

    slots: SlotSet | None
    """The concurrency key's slots."""
    rate: tuple[str, float] | None
    """The rate limit: its token bucket's KV key and tasks per second."""
    fair: bool
    """Under a fairness key: admitted while its WORK subject has room (``fairness_window``)."""
    weight: float
    """The lane's chance in the lottery between lanes (its fairness key's weight, else 1)."""
    reason: str
    """What its tasks wait for, for their ``held`` event."""


def gates(settings: Settings, task_type: str, limits: str | None) -> Gates | None:
    """The gates of a task of ``task_type`` with the :data:`~streamsched.subjects.H_LIMITS`
    header ``limits``, or None when it is under no limit (a rate limit that is no longer set
    holds nothing back)."""
    words = parse_header(limits) if limits else {}
    slots = None
    reasons: list[str] = []
    weight = 1.0
    if (key := words.get("c")) is not None:
        limit = _int(words.get("n")) or settings.concurrency_limits.get(key)
        if limit is not None and limit >= 1:
            slots = SlotSet(f"c.{_digest(key)}", min(limit, MAX_CONCURRENCY_LIMIT), key)
            reasons.append(f"a slot of concurrency key {key!r} (at most {limit} at once)")
    rate = None
    bucket = words.get("r", task_type)
    if (per_s := settings.rate_limits.get(bucket)) is not None:
        rate = (f"r.{_digest(bucket)}", per_s)
        reasons.append(f"rate limit {bucket!r} ({per_s:g}/s)")
    fair = words.get("f")
    if fair is not None:
        weight = settings.fairness_weights.get(fair, 1.0)
        reasons.append(f"its fair share as {fair!r} (weight {weight:g})")
    if not reasons:
        return None
    return Gates(slots, rate, fair is not None, weight, "waiting for " + " and ".join(reasons))


def lane(region: str, task_type: str, limits: str | None) -> str:
    """The lane (a subject token) of the tasks of one region and type under the same limits."""
    words = parse_header(limits) if limits else {}
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", words.get("f") or words.get("c") or words.get("r") or task_type)[:40]
    return f"{readable}-{_digest(region, task_type, limits or '')}"


def slots_header(held: list[tuple[str, int]]) -> str:
    """The :data:`~streamsched.subjects.H_SLOTS` header naming the slots a task holds."""
    return " ".join(f"{key}={revision}" for key, revision in held)


async def release(kv: KeyValue, header: str) -> None:
    """Delete the slots a finished task held (its :data:`~streamsched.subjects.H_SLOTS` header),
    each only if it is still the revision the task took (else it was swept and taken again)."""
    for word in header.split():
        key, _, revision = word.partition("=")
        try:
            await kv.delete(key, last=int(revision))
        except (KeyWrongLastSequenceError, NotFoundError, ValueError):
            pass  # swept already, or not ours any more
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                log.warning("could not free slot %s (%r); it is swept once its task's state is final", key, exc)
        except Exception as exc:  # noqa: BLE001 - an outage: admission sweeps it later
            log.warning("could not free slot %s (%r); it is swept once its task's state is final", key, exc)


class SlotValue(msgspec.Struct, frozen=True):
    """A slot's value: the task that holds it, and the concurrency key."""

    task: str
    key: str = ""


class TokenBucket(msgspec.Struct, frozen=True):
    """A rate limit's value: the tokens left at ``at`` (Unix seconds)."""

    tokens: float
    at: float


class Lane(msgspec.Struct, frozen=True, kw_only=True):
    """A lane as ``streamsched limits`` shows it: its tasks waiting, and what for."""

    subject: str
    priority: str
    region: str
    type: str
    parked: int
    waiting_for: str


class KeyInUse(msgspec.Struct, frozen=True, kw_only=True):
    """A concurrency key with slots held: by how many tasks, and which."""

    key: str
    held: int
    tasks: list[str]


async def lanes(bus: Bus, settings: Settings) -> list[Lane]:
    """Every lane that holds tasks, with what its oldest task waits for (one direct get per lane)."""
    info = await bus.js.stream_info(subjects.SCHED_STREAM, subjects_filter=subjects.HELD_ALL)
    found: list[Lane] = []
    for subject, parked in sorted((info.state.subjects or {}).items()):
        heads = await direct.next_on_subject(bus, subjects.SCHED_STREAM, subject, 1, 1)
        if not heads:
            continue
        head = heads[0].headers
        task_type = wire.header_value(head, subjects.H_TYPE) or ""
        gated = gates(settings, task_type, wire.header_value(head, subjects.H_LIMITS))
        region = wire.header_value(head, subjects.H_REGION) or ""
        waiting_for = gated.reason.removeprefix("waiting for ") if gated is not None else "admission (its limits are no longer set)"
        found.append(Lane(subject=subject, priority=subject.split(".")[1], region=region, type=task_type, parked=parked, waiting_for=waiting_for))
    return found


async def keys_in_use(bus: Bus) -> list[KeyInUse]:
    """The concurrency keys whose slots are held now, by key."""
    by_key: dict[str, list[str]] = {}
    for name, value in (await bucket_values(bus, subjects.LIMITS_BUCKET)).items():
        if name.startswith("c."):
            try:
                slot = msgspec.json.decode(value, type=SlotValue)
            except msgspec.DecodeError:
                continue
            by_key.setdefault(slot.key or name.rsplit(".", 1)[0], []).append(slot.task)
    return [KeyInUse(key=key, held=len(tasks), tasks=sorted(tasks)) for key, tasks in sorted(by_key.items())]


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
