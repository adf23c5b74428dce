"""Publish before ack: settling a role's upstream messages once what they led to has landed.

:class:`Settler` is the core every role shares. ``forward`` publishes a message's
downstream output, records its events and hands a task to a SCHED batch, all without
waiting; once every PubAck is in, the upstream message is acked (or nak'ed, after the
publishes were retried under the same ``Nats-Msg-Id``) and its credit goes back to the
:class:`~streamsched.transport.pull.Puller`. A crash at any point leaves the upstream
message un-acked, so JetStream redelivers it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ..eventlog import events as ev
from ..eventlog.recorder import EventRecorder, Recording
from ..transport.bus import ACK, REPUBLISH_DELAYS_S, Bus, Pending, explain, nak_with_delay
from ..transport.pull import Puller
from ..transport.wire import Delivery
from .sched_batches import TaskBatcher

log = logging.getLogger("streamsched.settle")

#: Seconds between two warnings of one settler that messages come back.
WARN_EVERY_S = 5.0
#: ``(subject, body, headers)`` of one downstream publish.
Publication = tuple[str, bytes, dict[str, str] | bytes | None]


class Settler:
    """Settles upstream messages after their downstream publishes and events land.

    ``forward(msg, publishes, events=...)`` publishes without waiting and records the
    events (with those of other messages of this loop tick, see
    :class:`~streamsched.eventlog.recorder.EventRecorder`); when every PubAck is in, the message is
    acked (or, if any publish failed, nak'ed with a short delay so it comes back and is
    published again under the same ``Nats-Msg-Id``), and its credit is released to the
    puller.
    """

    def __init__(
        self,
        bus: Bus,
        puller: Puller,
        *,
        source: str = "",
        partitions: int = 1,
        batcher: TaskBatcher | None = None,
        retry_delay_s: float = 1.0,
    ) -> None:
        """``source`` names the role in the subject of the events it records (``events.<source>``,
        in ``partitions`` projector partitions: the ``projector_partitions`` setting);
        ``batcher`` takes the hand-offs of :meth:`forward` (a master's SCHED publishes)."""
        self.bus = bus
        self.puller = puller
        self.recorder = EventRecorder(bus, source, partitions) if source else None
        self.batcher = batcher
        self.retry_delay_s = retry_delay_s
        self._tasks: set[asyncio.Task[None]] = set()  # referenced: the loop keeps tasks weakly
        self._next_warning = 0.0
        self._unwarned = 0

    def forward(
        self,
        msg: Delivery,
        publishes: Sequence[Publication],
        *,
        events: Sequence[ev.Event] = (),
        handoff: tuple[str, bytes, bytes] | None = None,
        reply: bytes = ACK,
        also: Sequence[Pending] = (),
        settled: Callable[[], None] | None = None,
        landed: Callable[[], None] | None = None,
    ) -> None:
        """Publish, record ``events`` and give ``handoff`` (subject, body, header block) to
        the batcher, then send ``reply`` for ``msg`` once these and ``also`` landed, and
        call ``landed`` (not when they failed for good and ``msg`` is nak'ed instead).

        Settling releases the message's credit to the puller, or calls ``settled``
        instead when the holder gave the credit back already (a worker frees a handler
        slot when the handler returns, before its outcome has landed).

        A failed publish (a lost PubAck in a reconnect, an election) is sent again with
        the same ``Nats-Msg-Id``, so it is never stored twice, after each of
        :data:`REPUBLISH_DELAYS_S`; only then is ``msg`` nak'ed to come back later (at once
        when the hand-off's SCHED batch failed after retries of its own).
        Events (and a hand-off) are added again only if their message failed for good. ``also`` (e.g. a
        ``started`` event already in flight) is waited for once. Nothing here waits, so a
        handler can call it from the read loop (see :class:`Puller`).
        """
        self._attempt(msg, _Forward(publishes, events, handoff, reply, settled, landed), also, 0)

    def _attempt(self, msg: Delivery, forward: _Forward, also: Sequence[Pending], round_: int) -> None:
        if forward.events and _needs_another(forward.recorded):
            assert self.recorder is not None, "a Settler that records events needs a source"
            forward.recorded = self.recorder.record(forward.events)
        if forward.handoff is not None and _needs_another(forward.handed):
            assert self.batcher is not None, "a Settler that hands off needs a batcher"
            forward.handed = self.batcher.add(*forward.handoff)
        waits = list(also)
        for message in (forward.recorded, forward.handed):
            if message is not None and not message.done:
                waits.append(message)
        try:
            self.bus.publish_all(forward.publishes, lambda error: self._landed(msg, forward, error, round_), waits)
        except Exception as exc:  # noqa: BLE001 - any failed publish takes the republish path
            self._landed(msg, forward, exc, round_)

    def _landed(self, msg: Delivery, forward: _Forward, error: BaseException | None, round_: int) -> None:
        if error is None:
            self.settle_reply(msg.reply, forward.reply, forward.settled)
            if forward.landed is not None:
                forward.landed()
        elif round_ < len(REPUBLISH_DELAYS_S) and not _failed_for_good(forward.handed):
            task = asyncio.get_running_loop().create_task(self._republish(msg, forward, round_))
            self._keep(task)
        else:
            self._warn_comes_back(msg, error)
            self.settle_reply(msg.reply, nak_with_delay(self.retry_delay_s), forward.settled)

    def _warn_comes_back(self, msg: Delivery, error: BaseException) -> None:
        """Log that ``msg`` comes back, at most once per :data:`WARN_EVERY_S` with a count
        of the others: a full stream refuses every message a role holds, for as long as it stays full."""
        now = time.monotonic()
        if now < self._next_warning:
            self._unwarned += 1
            return
        more = f" (and {self._unwarned} more since the last warning)" if self._unwarned else ""
        log.warning("downstream publish failed (%s); %s comes back in %.1fs%s", explain(error), msg.subject, self.retry_delay_s, more)
        self._next_warning, self._unwarned = now + WARN_EVERY_S, 0

    async def _republish(self, msg: Delivery, forward: _Forward, round_: int) -> None:
        await asyncio.sleep(REPUBLISH_DELAYS_S[round_])
        self._attempt(msg, forward, (), round_ + 1)

    def settle_after(self, msg: Delivery, step: Coroutine[Any, Any, object], what: str) -> None:
        """Run ``step``, an asynchronous hop for ``msg`` (its own asyncio task), then ack
        ``msg``; nak it to come back after ``retry_delay_s`` if the step raised (JetStream
        failed one of its round trips: each such hop is safe to repeat). ``what`` names
        the hop in the log line."""
        self._keep(asyncio.get_running_loop().create_task(self._settle_after(msg, step, what)))

    async def _settle_after(self, msg: Delivery, step: Coroutine[Any, Any, object], what: str) -> None:
        try:
            await step
        except Exception as exc:  # noqa: BLE001 - every failed step comes back
            log.warning("%s not done yet (%r); it comes back in %.1fs", what, exc, self.retry_delay_s)
            self.settle(msg, nak_with_delay(self.retry_delay_s))
            return
        self.settle(msg, ACK)

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def settle(self, msg: Delivery, reply: bytes) -> None:
        """Send ``reply`` (ACK, NAK, TERM…) for ``msg`` and release its credit.

        The reply is buffered, not awaited: it goes out with the other writes of this
        loop tick, and the puller turns the freed credit into one request after the tick.
        """
        self.settle_reply(msg.reply, reply)

    def settle_reply(self, ack_subject: str, reply: bytes, settled: Callable[[], None] | None = None) -> None:
        """:meth:`settle` for a message of which only its reply (ack) subject was kept;
        ``settled`` is called instead of releasing credit (see :meth:`forward`)."""
        try:
            self.bus.send(ack_subject, reply)
        except Exception as exc:  # noqa: BLE001 - disconnected: ack_wait redelivers it
            log.debug("could not settle %s: %r", ack_subject, exc)
        if settled is None:
            self.puller.release()
        else:
            settled()


def _failed_for_good(handed: Recording | None) -> bool:
    """True when the hand-off's SCHED batch failed after its own retries (a full SCHED
    refuses it for all of them): the message comes back at once instead of after as many
    rounds again, which would hold it past its consumer's ack_wait and have JetStream
    deliver it a second time meanwhile, a second copy for SCHED."""
    return handed is not None and handed.done and handed.error is not None


def _needs_another(message: Recording | None) -> bool:
    """True when parts have no message yet, or theirs failed for good: they go into a new one."""
    return message is None or (message.done and message.error is not None)


class _Forward:
    """What one upstream message led to: publishes, events and a hand-off (and the
    messages these went into), and the reply to send upstream when all of it landed."""

    __slots__ = ("events", "handed", "handoff", "landed", "publishes", "recorded", "reply", "settled")

    def __init__(
        self,
        publishes: Sequence[Publication],
        events: Sequence[ev.Event],
        handoff: tuple[str, bytes, bytes] | None,
        reply: bytes,
        settled: Callable[[], None] | None,
        landed: Callable[[], None] | None = None,
    ) -> None:
        self.publishes = publishes
        self.settled = settled
        self.landed = landed
        self.events = events
        self.handoff = handoff
        self.reply = reply
        self.recorded: Recording | None = None
        self.handed: Recording | None = None
