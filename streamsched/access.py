"""Who may do what on NATS: each role's least-privilege permissions, rendered as the
``accounts`` block of a nats-server config (``streamsched access render``).

One account, ``STREAMSCHED``, holds a user per role. Each may publish only the subjects
its role publishes and call only the JetStream API requests it makes, spelled out from
:mod:`streamsched.subjects` so a renamed subject renames its permission too:

* ``client``: submit, cancel and reprioritize, call the NATS service API, and read task
  and workflow states and the event log (``status``, ``--wait``, ``task history``);
* ``worker-<region>``: pull and ack only its region's WORK durables (those of the task
  types given at render time), record events, dead tasks and its heartbeat;
* ``regional-<region>``: pull its region's SCHED durables, release onto WORK (its own
  region's tasks, and any region's held tasks its admission loop admits) and the lanes;
* ``master``, ``projector``, ``api``: what their roles do (see :func:`grants`);
* ``admin``: everything, for ``streams apply`` and the operators' commands. Only the admin
  may delete or purge a stream; the one purge a role makes is of one subject of TIMERS
  (a cancelled delayed task's or a removed cron schedule's message schedule).

Passwords are never in the file: each user's is the environment variable named by
:func:`password_variable`, which nats-server reads at start; a role process gives its own
with ``NATS_USER`` and ``NATS_PASSWORD`` (or ``NATS_CREDS``), see
:mod:`streamsched.transport.credentials`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from . import subjects
from .config import Settings
from .transport.streams import consumer_configs

ACCOUNT = "STREAMSCHED"
#: Users that are not per region.
ADMIN, MASTER, PROJECTOR, API, CLIENT = "admin", "master", "projector", "api", "client"

JS_API = "$JS.API"
#: Every KV bucket, by who writes it (a role reads more than it writes).
ALL_BUCKETS = (
    subjects.STATE_BUCKET,
    subjects.CANCELS_BUCKET,
    subjects.WAITING_BUCKET,
    subjects.DEPENDANTS_BUCKET,
    subjects.WORKFLOWS_BUCKET,
    subjects.SCHEDULES_BUCKET,
    subjects.PRIORITIES_BUCKET,
    subjects.IDEMPOTENCY_BUCKET,
    subjects.WORKERS_BUCKET,
    subjects.REGIONS_BUCKET,
    subjects.BREAKERS_BUCKET,
    subjects.LIMITS_BUCKET,
)


@dataclass
class Grant:
    """What one user may publish and subscribe to."""

    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=lambda: ["_INBOX.>"])
    #: Subjects refused even where ``publish`` allows them (deny wins in nats-server).
    deny: list[str] = field(default_factory=list)
    #: May answer requests sent to it (a service, a worker's drain subject).
    allow_responses: bool = False

    def add(self, *subject_lists: Iterable[str]) -> Grant:
        for more in subject_lists:
            self.publish.extend(s for s in more if s not in self.publish)
        return self


def metadata() -> list[str]:
    """Read-only requests every user makes: server, stream and consumer info, flow control."""
    return [
        f"{JS_API}.INFO",
        f"{JS_API}.STREAM.INFO.*",
        f"{JS_API}.STREAM.NAMES",
        f"{JS_API}.STREAM.LIST",
        f"{JS_API}.CONSUMER.INFO.*.*",
        f"{JS_API}.CONSUMER.LIST.*",
        f"{JS_API}.CONSUMER.NAMES.*",
        "$JS.FC.>",
    ]


def direct(*streams: str) -> list[str]:
    """Read a stream's stored messages by direct get."""
    return [f"{JS_API}.{request}.{stream}{tail}" for stream in streams for request in ("DIRECT.GET", "STREAM.MSG.GET") for tail in ("", ".>")]


def scan(*streams: str) -> list[str]:
    """Read a stream through ephemeral consumers (watches, listings, the event feed): they
    are made with a name of their own, so this also allows making a consumer of any name:
    :func:`durable_guard` keeps the roles' durables out of reach."""
    requests = (("CREATE", ""), ("CREATE", ".>"), ("MSG.NEXT", ".*"))
    return [f"{JS_API}.CONSUMER.{request}.{stream}{tail}" for stream in streams for request, tail in requests]


def kv(*buckets: str, write: bool = False) -> list[str]:
    """Read (and with ``write`` put, create, update and delete keys of) KV buckets."""
    streams = [f"KV_{bucket}" for bucket in buckets]
    return direct(*streams) + scan(*streams) + ([f"$KV.{bucket}.>" for bucket in buckets] if write else [])


def pull(stream: str, *consumers: str, create: bool = False) -> list[str]:
    """Fetch from and ack durables of ``stream`` (and with ``create`` make and update them)."""
    out: list[str] = []
    for consumer in consumers:
        out += [f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}", f"$JS.ACK.{stream}.{consumer}.>"]
        if create:
            out += making(f"{stream}.{consumer}")
    return out


def making(durable: str) -> list[str]:
    """Making or updating the durable ``<stream>.<name>``: both spellings of the request."""
    return [f"{JS_API}.CONSUMER.DURABLE.CREATE.{durable}", f"{JS_API}.CONSUMER.CREATE.{durable}", f"{JS_API}.CONSUMER.CREATE.{durable}.>"]


def change(stream: str, *, delete_messages: bool = False, pause: bool = False, purge_subjects: bool = False) -> list[str]:
    """Requests that change a stream's messages or consumers other than by acking."""
    out = [f"{JS_API}.STREAM.MSG.DELETE.{stream}"] if delete_messages else []
    out += [f"{JS_API}.CONSUMER.PAUSE.{stream}.*"] if pause else []
    return out + ([f"{JS_API}.STREAM.PURGE.{stream}"] if purge_subjects else [])


def durable_guard(settings: Settings) -> list[str]:
    """Making, changing or deleting a role's durable, refused to every user but the admin
    (the workers make their WORK durables, which no other user may scan)."""
    durables = [f"{stream}.{config.durable_name}" for stream, config in consumer_configs(settings)]
    return [subject for durable in durables for subject in [*making(durable), f"{JS_API}.CONSUMER.DELETE.{durable}"]]


def submitting(settings: Settings) -> list[str]:
    """What a submitter publishes: tasks on every ingress subject, cancel and reprioritize requests."""
    return [subjects.SUBMIT, *map(subjects.submit, settings.priorities), subjects.CANCEL, subjects.REPRIORITIZE]


def worker_grant(settings: Settings, region: str, task_types: Sequence[str] | None) -> Grant:
    """A worker of ``region``: its WORK durables only (every one of the region when the task
    types are not given: a durable's name holds the region but a permission cannot match
    part of a name, so then it is any WORK durable)."""
    durables = ["*"] if task_types is None else [subjects.work_consumer(region, p, t) for p in settings.priorities for t in task_types]
    grant = Grant(subscribe=["_INBOX.>", subjects.worker_drain("x").replace(".x.", ".*.")], allow_responses=True)
    return grant.add(
        metadata(),
        pull(subjects.WORK_STREAM, *durables, create=True),
        [*subjects.EVENTS_RECORDED, subjects.dlq("*")],
        kv(subjects.WORKERS_BUCKET, subjects.LIMITS_BUCKET, subjects.BREAKERS_BUCKET, write=True),
        kv(subjects.STATE_BUCKET, subjects.CANCELS_BUCKET, subjects.PRIORITIES_BUCKET),
    )


def regional_grant(settings: Settings, region: str) -> Grant:
    return Grant().add(
        metadata(),
        pull(subjects.SCHED_STREAM, *(subjects.sched_consumer(region, p) for p in settings.priorities)),
        # Any region's WORK: every regional scheduler's admission loop may admit any region's
        # held tasks (so a region whose scheduler is down still has them admitted).
        [subjects.WORK_ALL, subjects.HELD_ALL, *subjects.EVENTS_RECORDED, subjects.dlq("*")],
        direct(subjects.SCHED_STREAM),
        change(subjects.SCHED_STREAM, delete_messages=True),
        kv(subjects.REGIONS_BUCKET, subjects.LIMITS_BUCKET, subjects.BREAKERS_BUCKET, write=True),
        kv(subjects.STATE_BUCKET, subjects.CANCELS_BUCKET, subjects.WORKERS_BUCKET, subjects.PRIORITIES_BUCKET),
    )


def master_grant(settings: Settings) -> Grant:
    durables = [(stream, config.durable_name or "") for stream, config in consumer_configs(settings)]
    mine = {subjects.TASKS_STREAM, subjects.FINISHED_STREAM, subjects.TIMERS_STREAM}
    return Grant().add(
        metadata(),
        *(pull(stream, name) for stream, name in durables if stream in mine),
        submitting(settings),
        ["sched.>", subjects.HELD_ALL, subjects.WORK_ALL, subjects.TIMERS_ALL, subjects.REJECTED, *subjects.EVENTS_RECORDED, subjects.dlq("*")],
        direct(subjects.TIMERS_STREAM, subjects.SCHED_STREAM, subjects.WORK_STREAM, subjects.TASKS_STREAM),
        change(subjects.WORK_STREAM, delete_messages=True, pause=True),
        change(subjects.SCHED_STREAM, delete_messages=True),
        change(subjects.TIMERS_STREAM, purge_subjects=True),
        kv(*ALL_BUCKETS, write=True),
    )


def projector_grant(settings: Settings) -> Grant:
    return Grant().add(
        metadata(),
        pull(subjects.EVENTS_STREAM, *subjects.projector_consumers(settings.projector_partitions)),
        [subjects.FINISHED, *subjects.EVENTS_RECORDED],
        direct(subjects.EVENTS_STREAM),
        kv(subjects.STATE_BUCKET, subjects.WORKFLOWS_BUCKET, write=True),
        kv(*ALL_BUCKETS),
    )


def api_grant(settings: Settings) -> Grant:
    """The API process: a client that also serves the NATS service API and re-drives dead tasks."""
    grant = Grant(subscribe=["_INBOX.>", "streamsched.api.>", "$SRV.>"], allow_responses=True)
    return grant.add(
        metadata(),
        submitting(settings),
        direct(subjects.EVENTS_STREAM, subjects.DLQ_STREAM),
        scan(subjects.EVENTS_STREAM, subjects.DLQ_STREAM),
        change(subjects.DLQ_STREAM, delete_messages=True),
        kv(*ALL_BUCKETS),
    )


def client_grant(settings: Settings) -> Grant:
    return Grant().add(
        metadata(),
        submitting(settings),
        ["streamsched.api.>", "$SRV.>"],
        direct(subjects.EVENTS_STREAM),
        scan(subjects.EVENTS_STREAM),
        kv(*ALL_BUCKETS),
    )


def grants(settings: Settings, task_types: dict[str, Sequence[str]] | None = None) -> dict[str, Grant]:
    """Every user's grant; ``task_types`` (by region) narrows each region's workers to the
    WORK durables of those types."""
    out = {MASTER: master_grant(settings), PROJECTOR: projector_grant(settings)}
    for region in settings.regions:
        out[f"regional-{region}"] = regional_grant(settings, region)
        out[f"worker-{region}"] = worker_grant(settings, region, (task_types or {}).get(region))
    out[API] = api_grant(settings)
    out[CLIENT] = client_grant(settings)
    guard = durable_guard(settings)
    for grant in out.values():
        grant.deny = guard
    return {ADMIN: Grant(publish=[">"], subscribe=[">"], allow_responses=True), **out}


def password_variable(user: str) -> str:
    """The environment variable holding ``user``'s password when nats-server starts."""
    return "NATS_PASSWORD_" + user.upper().replace("-", "_")


def render(settings: Settings, task_types: dict[str, Sequence[str]] | None = None) -> str:
    """The ``accounts`` block (nats-server config syntax; JSON values are valid in it)."""
    lines = [
        "# Users per role with least-privilege permissions; rendered by `streamsched access render`.",
        "# Each password is read from the environment variable it names when nats-server starts.",
        "accounts {",
        f"  {ACCOUNT}: {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    for user, grant in grants(settings, task_types).items():
        publish: dict[str, list[str]] = {"allow": grant.publish, **({"deny": grant.deny} if grant.deny else {})}
        permissions: dict[str, object] = {"publish": publish, "subscribe": {"allow": grant.subscribe}}
        if grant.allow_responses:
            permissions["allow_responses"] = True
        body = json.dumps(permissions, indent=2).replace("\n", "\n        ")
        lines += ["      {", f"        user: {json.dumps(user)}", f"        password: ${password_variable(user)}"]
        lines += [f"        permissions: {body}", "      }"]
    lines += ["    ]", "  }", "}"]
    return "\n".join(lines) + "\n"
