"""Idempotency keys: a submission's ``idempotency_key`` names the task it stands for, beyond
JetStream's duplicate window.

The first task to take a key holds it in KV ``idempotency`` for ``idempotency_ttl_s``,
with a per-key TTL (``kv.create(..., msg_ttl=)``): the entry expires on its own, and only
``create`` is used, since an update would drop the TTL. The value is the task's id, and
when a master took it, ``@`` and the submission's TASKS stream sequence: a redelivery of
that submission (same sequence) goes on, while the same id and key submitted again (a
new sequence, past JetStream's duplicate window) is a duplicate like any other.
:meth:`streamsched.client.Client.submit` takes the key itself (its id alone), so it can
answer with the first task's handle at once, without publishing, and gives it back if its
publish fails; the master takes it for every submission (a ``nats pub`` too), and a
submission whose key another task holds is rejected as a duplicate of that task, so it
can be looked up.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from .. import subjects
from ..transport.bus import Bus

#: Keys used as they are (others are hashed): a safe subset of what a KV key may hold.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_=-]{1,200}")
#: Rounds of "taken, but expired before it could be read" before giving up.
_ROUNDS = 3


def kv_key(key: str) -> str:
    """The KV key of an idempotency key: itself when it is a valid KV key, else its SHA-256
    (prefixed differently, so a key never collides with another's hash)."""
    if _PLAIN_KEY.fullmatch(key):
        return f"key.{key}"
    return f"sha256.{hashlib.sha256(key.encode()).hexdigest()}"


class Claim:
    """Who holds a key: ``value`` as stored (``<id>`` or ``<id>@<sequence>``), and its revision."""

    def __init__(self, value: str, revision: int, taken_now: bool) -> None:
        self.value = value
        self.revision = revision
        self.taken_now = taken_now
        """True when this call took the key."""

    @property
    def holder(self) -> str:
        """The id of the task that holds the key."""
        return self.value.partition("@")[0]


async def claim(bus: Bus, key: str, value: str, ttl_s: float) -> Claim:
    """Take ``key`` with ``value`` unless it is taken; returns who holds it."""
    kv = await bus.js.key_value(subjects.IDEMPOTENCY_BUCKET)
    name = kv_key(key)
    # nats-server's per-message TTL is whole seconds, at least one.
    ttl = max(1, math.ceil(ttl_s))
    for _ in range(_ROUNDS):
        try:
            return Claim(value, await kv.create(name, value.encode(), msg_ttl=ttl), taken_now=True)
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(name)
            except KeyNotFoundError:  # expired (or was deleted) since: try to take it again
                continue
            if entry.value:
                return Claim(entry.value.decode(), entry.revision or 0, taken_now=False)
    raise ConnectionError(f"idempotency key {key!r} could not be taken or read")


async def give_back(bus: Bus, key: str, taken: Claim) -> None:
    """Release a key this process took, if nobody changed it since (a publish that failed)."""
    kv = await bus.js.key_value(subjects.IDEMPOTENCY_BUCKET)
    with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
        await kv.delete(kv_key(key), last=taken.revision)


def admits(taken: Claim, task_id: str, sequence: int) -> bool:
    """True when the master may take in submission ``sequence`` of ``task_id`` under a key
    held as ``taken``: it took it now, or the key names this very submission (a
    redelivery), or a client took it for this id and this is its submission."""
    return taken.taken_now or taken.value in (f"{task_id}@{sequence}", task_id)
