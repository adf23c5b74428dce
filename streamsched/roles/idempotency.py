"""Idempotency keys: a submission's ``idempotency_key`` names the task it stands for, beyond
JetStream's duplicate window.

The first task to take a key holds it in KV ``idempotency`` (value: its id) for
``idempotency_ttl_s``, with a per-key TTL (``kv.create(..., msg_ttl=)``): the entry
expires on its own, and only ``create`` is used, since an update would drop the TTL.
:meth:`streamsched.client.Client.submit` takes the key itself, so it can answer with the
first task's handle at once, without publishing; the master takes it for every
submission (a ``nats pub`` too), and a submission whose key another task holds is
rejected as a duplicate of that task, so it can be looked up.
"""

from __future__ import annotations

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


async def claim(bus: Bus, key: str, task_id: str, ttl_s: float) -> str:
    """Take ``key`` for ``task_id`` unless a task holds it; returns the holder's id (``task_id``
    when this call, or an earlier one for the same task, took it)."""
    kv = await bus.js.key_value(subjects.IDEMPOTENCY_BUCKET)
    name = kv_key(key)
    # nats-server's per-message TTL is whole seconds, at least one.
    ttl = max(1, math.ceil(ttl_s))
    for _ in range(_ROUNDS):
        try:
            await kv.create(name, task_id.encode(), msg_ttl=ttl)
            return task_id
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(name)
            except KeyNotFoundError:  # expired (or was deleted) since: try to take it again
                continue
            if entry.value:
                return entry.value.decode()
    raise ConnectionError(f"idempotency key {key!r} could not be taken or read")
