"""Following a KV bucket: every put, delete and expiry of its keys, in order, from what it holds now.

:class:`BucketWatch` reads the bucket's stream with an ordered consumer (push-based, as
nats-py has it) from its first message, and counts the entries held at the start as loaded
once it has seen the stream's last sequence of that moment, or caught up with the stream
(that message may have expired since): nats-py's own watcher signals "no more values" by a
marker that can come before the values. The roles' in-memory mirrors
(cancelled ids, live workers, live regional schedulers) are built on it.
:func:`bucket_values` reads what a bucket holds once, for the commands that list it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from .answering import when_answered
from .bus import Bus
from .reading import Since, read


def is_removal(headers: dict[str, str], data: bytes) -> bool:
    """True for a KV message that removes its key: a delete or purge, or the marker the
    server leaves when the key expires (a bucket with ``limit_marker_ttl``)."""
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers or not data


async def bucket_values(bus: Bus, bucket: str) -> dict[str, bytes]:
    """The value of every key ``bucket`` holds now, read once from its stream (removed keys left out)."""
    prefix = f"$KV.{bucket}."
    values: dict[str, bytes] = {}
    async for stored in read(bus, f"KV_{bucket}", prefix + ">", Since(seq=1)):
        key = stored.subject[len(prefix) :]
        if is_removal(stored.headers, stored.data):
            values.pop(key, None)
        else:
            values[key] = stored.data
    return values


class BucketWatch:
    """Calls ``on_change(key, value)`` on the event loop for every put of a key in ``bucket``,
    and ``on_change(key, None)`` for every removal (see :func:`is_removal`)."""

    def __init__(self, bus: Bus, bucket: str, on_change: Callable[[str, bytes | None], None]) -> None:
        self.bus = bus
        self.bucket = bucket
        self.on_change = on_change
        self._prefix = f"$KV.{bucket}."
        self._loaded = asyncio.Event()
        self._load_until = 0
        self._sub: Any = None

    @property
    def loaded(self) -> bool:
        """The entries the bucket held at :meth:`start` have all been passed to ``on_change``."""
        return self._loaded.is_set()

    async def start(self, timeout_s: float) -> bool:
        """Subscribe and wait up to ``timeout_s`` until the entries held now are in; False if
        they were not all in by then (the rest follow)."""
        await when_answered(self._subscribe, f"to a watch of KV {self.bucket}")
        try:
            await asyncio.wait_for(self._loaded.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _subscribe(self) -> None:
        stream = f"KV_{self.bucket}"
        state = (await self.bus.js.stream_info(stream)).state
        self._load_until = state.last_seq if state.messages else 0
        if self._load_until == 0:
            self._loaded.set()
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        self._sub = await self.bus.js.subscribe(self._prefix + ">", stream=stream, ordered_consumer=True, config=config, cb=self._on_message)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):  # the connection is already gone
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_message(self, msg: Any) -> None:
        data: bytes = msg.data or b""
        self.on_change(msg.subject[len(self._prefix) :], None if is_removal(msg.headers or {}, data) else data)
        metadata = msg.metadata
        if not self._loaded.is_set() and (metadata.sequence.stream >= self._load_until or metadata.num_pending == 0):
            self._loaded.set()
