"""Cron schedules: recurring tasks whose clock is nats-server's.

A schedule is a definition in KV ``schedules`` (key = its name: the pattern, the time zone,
the task template, whether it is paused) and, while it is not paused, a live JetStream
message schedule on ``timers.cron.<name>`` in TIMERS whose body is the template and whose
target is ``timers.due``. At every slot the server stores a copy there and a master
(:mod:`streamsched.roles.timers`) submits a new task from it, with the id
``<name>-<slot time>`` (:func:`slot_submission`): the same slot always gets the same id,
so a redelivered firing or a second master never makes two tasks.

Patterns are what nats-server takes: 6-field cron (seconds first), ``@hourly``-style
macros and ``@every <duration>`` of a second or more. A pattern, time zone or template
that cannot be honoured is refused here, before anything is stored.
"""

from __future__ import annotations

import datetime
import re
import zoneinfo

import msgspec
from nats.js.errors import BadRequestError, KeyWrongLastSequenceError, NoKeysError, NotFoundError

from .. import subjects
from ..config import Settings
from ..errors import NotFound, Rejected
from ..model import Envelope, decode_submission, envelope_decoder
from ..transport.bus import Bus
from .checks import check_fields

#: Schedule names are subject tokens; short enough that ``<name>-<slot>`` is a task id.
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,100}")
#: The macros nats-server takes besides ``@every``.
MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_FIELD_RE = re.compile(r"[0-9A-Za-z*/,?-]+")
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
#: nats-server's error code for a pattern it cannot parse.
BAD_PATTERN = 10189


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """One schedule's definition, as kept in KV ``schedules``."""

    name: str
    cron: str
    """6-field cron (seconds first), a macro such as ``@hourly``, or ``@every 30s``."""
    template: msgspec.Raw
    """The task each slot submits (an envelope without ``id``)."""
    time_zone: str | None = None
    """IANA zone the cron fields are read in (``Europe/Berlin``); UTC when missing."""
    paused: bool = False


_decoder = msgspec.json.Decoder(Schedule)


def check_pattern(pattern: str) -> None:
    """Refuse a pattern nats-server would refuse or could not honour, with the reason."""
    text = pattern.strip()
    if text.startswith("@every"):
        duration = text[len("@every") :].strip()
        if not _DURATION_RE.fullmatch(duration):
            raise Rejected(f"`{pattern}`: @every takes a duration such as 30s, 5m or 1h30m")
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(duration))
        if seconds < 1:
            raise Rejected(f"`{pattern}`: @every must be at least 1s (nats-server fires schedules to the second)")
        return
    if text.startswith("@"):
        if text in MACROS:
            return
        raise Rejected(f"`{pattern}` is not a known macro (one of {', '.join(sorted(MACROS))}, or @every <duration>)")
    fields = text.split()
    if len(fields) == 5:
        raise Rejected(f"`{pattern}` has 5 fields; schedules take 6, seconds first (e.g. `0 {text}` for second 0)")
    if len(fields) != 6:
        raise Rejected(f"`{pattern}` has {len(fields)} fields; a cron pattern has 6: second minute hour day month weekday")
    for field in fields:
        if not _FIELD_RE.fullmatch(field):
            raise Rejected(f"`{pattern}`: field {field!r} is not a cron field")


def check_time_zone(time_zone: str) -> None:
    try:
        zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise Rejected(f"unknown time zone {time_zone!r} (an IANA name such as Europe/Berlin)") from None


def check_template(template: bytes, settings: Settings) -> None:
    """Check the template as the master will check each slot's task."""
    envelope = decode_submission(template, max_bytes=settings.max_payload_bytes)
    if envelope.id is not None:
        raise Rejected("a schedule's task has no `id`: each slot gets `<name>-<slot time>`")
    for field in ("run_at", "delay_s", "deadline", "cron", "idempotency_key"):
        if getattr(envelope, field) is not None:
            raise Rejected(f"`{field}` does not go on a schedule's task (use `deadline_s`, relative to each slot)")
    check_fields(envelope, settings)


def check(schedule: Schedule, settings: Settings) -> None:
    """Refuse a schedule that cannot be honoured, with the reason."""
    if not NAME_RE.fullmatch(schedule.name):
        raise Rejected(f"schedule name {schedule.name!r} must be 1-100 characters of A-Z a-z 0-9 _ -")
    check_pattern(schedule.cron)
    if schedule.time_zone is not None:
        check_time_zone(schedule.time_zone)
        if schedule.cron.strip().startswith("@every"):
            raise Rejected("a time zone applies to cron fields, not to @every (nats-server refuses the pair)")
    check_template(bytes(schedule.template), settings)


def slot_task_id(name: str, fired_at: float) -> str:
    """The id of the task of the slot that fired at ``fired_at``: the schedule's name and the
    slot's second. Rounded, not truncated: a firing lands a little after its slot."""
    slot = datetime.datetime.fromtimestamp(round(fired_at), datetime.UTC)
    return f"{name}-{slot:%Y%m%dT%H%M%SZ}"


def slot_submission(name: str, template: bytes, fired_at: float) -> tuple[str, str, bytes] | None:
    """``(task id, priority, submission)`` of one slot, labelled ``schedule=<name>``; ``None``
    if the template is not a task."""
    try:
        envelope = envelope_decoder.decode(template)
    except msgspec.DecodeError:
        return None
    task_id = slot_task_id(name, fired_at)
    task = msgspec.structs.replace(envelope, id=task_id, labels={**envelope.labels, "schedule": name})
    return task_id, task.priority, msgspec.json.encode(task)


def _live_headers(schedule: Schedule) -> dict[str, str]:
    headers = {
        "Nats-Schedule": schedule.cron,
        "Nats-Schedule-Target": subjects.TIMERS_DUE,
        subjects.H_SCHEDULE: schedule.name,
    }
    if schedule.time_zone:
        headers["Nats-Schedule-Time-Zone"] = schedule.time_zone
    return headers


async def _go_live(bus: Bus, schedule: Schedule) -> None:
    """Publish the message schedule (no ``Nats-Msg-Id``: a resume must not be deduplicated)."""
    try:
        await bus.js.publish(subjects.cron(schedule.name), bytes(schedule.template), headers=_live_headers(schedule))
    except BadRequestError as exc:
        if exc.err_code == BAD_PATTERN:
            raise Rejected(f"`{schedule.cron}` was refused by nats-server: {exc.description}") from None
        raise Rejected(f"nats-server refused the schedule: {exc.description}") from None


async def _stop_live(bus: Bus, name: str) -> None:
    await bus.js.purge_stream(subjects.TIMERS_STREAM, subject=subjects.cron(name))


async def add(bus: Bus, schedule: Schedule, settings: Settings) -> None:
    """Check, start and store a schedule; raises :class:`Rejected` with the reason (nothing stored)."""
    check(schedule, settings)
    kv = await bus.js.key_value(subjects.SCHEDULES_BUCKET)
    if await _get(bus, schedule.name) is not None:
        raise Rejected(f"a schedule named {schedule.name!r} exists; remove it first")
    if not schedule.paused:
        await _go_live(bus, schedule)
    try:
        await kv.create(schedule.name, msgspec.json.encode(schedule))
    except KeyWrongLastSequenceError:
        raise Rejected(f"a schedule named {schedule.name!r} exists; remove it first") from None


async def _get(bus: Bus, name: str) -> tuple[Schedule, int] | None:
    kv = await bus.js.key_value(subjects.SCHEDULES_BUCKET)
    try:
        entry = await kv.get(name)
    except NotFoundError:  # KeyNotFoundError and KeyDeletedError are ones
        return None
    if not entry.value:
        return None
    return _decoder.decode(entry.value), entry.revision or 0


async def get(bus: Bus, name: str) -> Schedule:
    found = await _get(bus, name)
    if found is None:
        raise NotFound(f"no schedule {name!r}")
    return found[0]


async def listing(bus: Bus) -> list[Schedule]:
    """Every schedule, by name."""
    kv = await bus.js.key_value(subjects.SCHEDULES_BUCKET)
    try:
        names = await kv.keys()
    except NoKeysError:  # nats-py raises it for an empty bucket
        return []
    found = [await _get(bus, name) for name in sorted(names)]
    return [schedule for schedule, _ in filter(None, found)]


async def remove(bus: Bus, name: str) -> None:
    """Stop the schedule and delete its definition."""
    await get(bus, name)
    await _stop_live(bus, name)
    kv = await bus.js.key_value(subjects.SCHEDULES_BUCKET)
    await kv.delete(name)


async def set_paused(bus: Bus, name: str, paused: bool) -> Schedule:
    """Pause (take the live schedule away) or resume (publish it again); returns the definition."""
    found = await _get(bus, name)
    if found is None:
        raise NotFound(f"no schedule {name!r}")
    schedule, revision = found
    changed = msgspec.structs.replace(schedule, paused=paused)
    kv = await bus.js.key_value(subjects.SCHEDULES_BUCKET)
    # Resumed: live first, then marked; paused: marked first, then stopped. A failure half-way
    # leaves it marked paused and maybe live, which pausing again puts right.
    if not paused:
        await _go_live(bus, changed)
    await kv.update(name, msgspec.json.encode(changed), last=revision)
    if paused:
        await _stop_live(bus, name)
    return changed


def template(envelope: Envelope) -> msgspec.Raw:
    """A task template as stored: the envelope's JSON."""
    return msgspec.Raw(msgspec.json.encode(envelope))
