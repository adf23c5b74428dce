"""Reading a stream back from a point: the ephemeral consumer behind the tools.

:func:`read` gives every message on a subject from a stream sequence or a time, with an
ephemeral, unacknowledged pull consumer; without ``follow`` it stops at the last message
that existed when it began. The event log reader, the DLQ tools, replay and the state
store's full scan all read this way.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from .bus import Bus, stored_at_ns

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Since:
    """Where a read starts: a stream sequence, or a wall-clock time."""

    seq: int | None = None
    time: datetime | None = None

    @classmethod
    def parse(cls, text: str | None) -> Since:
        """``10m`` / ``2h`` / ``1d`` ago, a stream sequence (``1234``) or an RFC 3339 time."""
        if not text:
            return cls(seq=1)
        if text.isdigit():
            return cls(seq=int(text))
        match = _DURATION.fullmatch(text)
        if match:
            seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
            return cls(time=datetime.fromtimestamp(time.time() - seconds, UTC))
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"--since {text!r}: expected a duration (10m, 2h, 1d), a sequence or an RFC 3339 time") from None
        return cls(time=moment if moment.tzinfo else moment.replace(tzinfo=UTC))


@dataclass(frozen=True)
class Stored:
    """A message as read back from a stream."""

    seq: int
    stored_ns: int
    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass
class ReadStats:
    read: int = 0
    skipped: int = 0


async def read(
    bus: Bus,
    stream: str,
    subject: str | Sequence[str],
    since: Since,
    *,
    follow: bool = False,
    stats: ReadStats | None = None,
    batch: int = 1000,
) -> AsyncIterator[Stored]:
    """Every message on ``subject`` (or on any of several filters that do not overlap) from
    ``since`` (up to the last one at the start, unless ``follow``)."""
    filters = [subject] if isinstance(subject, str) else list(subject)
    stats = stats if stats is not None else ReadStats()
    info = await bus.js.stream_info(stream)
    end_seq = info.state.last_seq
    if not follow and (info.state.messages == 0 or (since.seq is not None and since.seq > end_seq)):
        return
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True, max_ack_pending=-1)
    if since.time is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = since.time
    else:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = max(1, since.seq or 1)
    if len(filters) > 1:
        config.filter_subjects = filters  # nats-py then leaves filter_subject unset
    psub = await bus.js.pull_subscribe(filters[0], durable=None, stream=stream, config=config)
    try:
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except TimeoutError:
                if follow:
                    continue
                # Nothing more matches up to the end we saw at the start.
                pending = (await psub.consumer_info()).num_pending
                if pending == 0:
                    return
                continue
            for msg in msgs:
                seq = msg.metadata.sequence.stream
                if not follow and seq > end_seq:
                    return
                stats.read += 1
                yield Stored(seq, stored_at_ns(msg.reply), msg.subject, msg.data or b"", dict(msg.headers or {}))
            if not follow and msgs and msgs[-1].metadata.sequence.stream >= end_seq:
                return
    finally:
        with contextlib.suppress(nats.errors.Error):  # the ephemeral consumer expires on its own
            await psub.unsubscribe()
