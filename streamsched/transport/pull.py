"""Continuous pull with credit across priority levels.

:class:`Puller` keeps pull requests outstanding on several durable consumers, one per
priority level, with *credit*: it never asks the server for more messages than its
holder has free capacity, so a process never holds more than ``capacity`` un-acked
messages (backpressure stays JetStream's), and it asks higher levels first. Messages
are handed to the holder from the connection's read loop (with several levels, right
after each read, highest level first). Settling them after their downstream publishes
landed is :mod:`streamsched.roles.settle`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import nats.errors

from . import wire
from .bus import Bus
from .wire import Delivery

log = logging.getLogger("streamsched.pull")

#: Expiry of a long-poll pull request; a lost request costs at most this much idle time.
LONG_POLL_S = 5.0
#: Expiry of a "take what is there now" pull request on a level that has a backlog.
SHORT_POLL_S = 0.002
#: Expiry of the polls that go round the levels when there is less credit than levels.
SCARCE_POLL_S = 0.1
#: Idle levels together hold at most ``1 / IDLE_SHARE`` of the capacity in long polls
#: (each at least one message), so a level that turns busy finds most credit free.
IDLE_SHARE = 4


class _Level:
    __slots__ = ("consumer", "hot", "inbox", "last_seen", "outstanding", "received", "sub")

    def __init__(self, consumer: str, inbox: str) -> None:
        self.consumer = consumer
        self.inbox = inbox
        self.outstanding = 0  # messages asked for and not yet delivered or expired
        self.hot = True  # the level may have a backlog: ask it for a batch
        self.last_seen = time.monotonic()
        self.sub: Any = None
        self.received: collections.deque[Delivery] = collections.deque()  # parsed, not yet handed over


class Puller:
    """Continuous pull from one or more durable consumers of one stream, with credit.

    ``consumers`` are in priority order, highest first. Each delivered message is passed
    to ``on_message(level, msg)`` and counts against ``capacity`` until the holder calls
    :meth:`release`. Free capacity goes to the highest level that has a backlog, except
    that every ``share_every``-th allocation starts at a lower level, so lower levels
    keep a small share and never starve. Consumers of equal priority (a worker reads one
    durable per task type and priority) are given the same ``ranks`` entry: the levels of
    a rank with a backlog share its credit. Levels without a backlog keep a long-poll
    request open, so a new task anywhere is seen at once: of one message, or of a few
    when capacity allows (together at most a quarter of it, see :data:`IDLE_SHARE`). With
    less capacity than levels they are polled in turn instead (:meth:`_allocate_scarce`).

    ``on_message`` is synchronous and must not block: it forwards
    (:meth:`~streamsched.roles.settle.Settler.forward` does not wait), records or spawns. With one level it is
    called from the read loop as each message is parsed. With several, the messages
    parsed in one turn of the read loop are handed over right after it, highest level
    first (every ``share_every``-th pick from the lowest, so lows already delivered, whose
    ack_wait runs, are not held back for long): a high message that arrives behind a
    burst of lows does not wait for them. Handing over from the read loop also costs no
    coroutine per message and no task wake-up per batch, which a task taking them from
    queues would: about a tenth of a hop's CPU.
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        consumers: Sequence[str],
        capacity: int,
        on_message: Callable[[int, Delivery], None],
        *,
        share_every: int = 8,
        ranks: Sequence[int] | None = None,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.capacity = capacity
        self.on_message = on_message
        self.share_every = share_every
        prefix = bus.nc.new_inbox()
        self.levels = [_Level(name, f"{prefix}.{i}") for i, name in enumerate(consumers)]
        # Levels of one rank (a priority, over several consumers) share free credit.
        ranks = list(range(len(consumers))) if ranks is None else list(ranks)
        self._peers = [[self.levels[j] for j, r in enumerate(ranks) if r == rank] for rank in ranks]
        self.held = 0
        self._rounds = 0
        self._handed = 0
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopped = False
        bus.on_reconnect(self.reset)

    @property
    def free(self) -> int:
        return self.capacity - self.held - sum(level.outstanding for level in self.levels)

    @property
    def running(self) -> bool:
        """True while :meth:`run` keeps requests outstanding: not before it started, nor once stopped."""
        return self._loop is not None and not self._stopped

    def release(self, count: int = 1) -> None:
        """The holder is done with ``count`` messages (acked, nak'ed or termed)."""
        self.held -= count
        if self.capacity < len(self.levels):
            # A slot is free: look at every level again, highest first (see _allocate_scarce).
            for level in self.levels:
                level.hot = True
        self._wake.set()

    def reset(self) -> None:
        """Forget outstanding requests (after a reconnect the server no longer has them)."""
        for level in self.levels:
            level.outstanding = 0
            level.hot = True
        self._wake.set()

    def stop(self) -> None:
        """Ask for nothing more. Messages already requested may still arrive."""
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        """Subscribe and keep requests outstanding until :meth:`stop`."""
        self._loop = asyncio.get_running_loop()
        for index, level in enumerate(self.levels):
            level.sub = await self.bus.subscribe(level.inbox, self._handler(index))
        # A timeout on each wait below would cost a task and a timer per loop turn.
        watchdog = self._loop.create_task(self._watch_requests())
        probe = self._loop.create_task(self._probe_levels()) if self.capacity < len(self.levels) else None
        try:
            while not self._stopped:
                for subject, body, inbox in self._allocate():
                    try:
                        self.bus.send(subject, body, inbox)
                    except Exception as exc:  # noqa: BLE001 - disconnected: the reconnect resets credit
                        log.debug("pull request not sent: %r", exc)
                await self._wake.wait()
                self._wake.clear()
                # Let releases of the same loop tick accumulate into one bigger request.
                await asyncio.sleep(0)
        finally:
            self._stopped = True
            watchdog.cancel()
            if probe is not None:
                probe.cancel()

    async def finish(self, timeout_s: float = 10.0) -> None:
        """After :meth:`stop`: wait until held messages are settled, then unsubscribe.

        Unsubscribing matters: the server only drops this process's open pull requests
        once their reply inbox has no interest; until then it would still deliver to it.
        """
        deadline = time.monotonic() + timeout_s
        while self.held > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        """Stop receiving; call after :meth:`stop`."""
        for level in self.levels:
            if level.sub is not None and not self.bus.nc.is_closed:
                with contextlib.suppress(nats.errors.Error):  # the connection is already gone
                    await wire.unsubscribe(self.bus.nc, level.sub)
                level.sub = None

    def _handler(self, index: int) -> wire.Handler:
        level = self.levels[index]
        single = len(self.levels) == 1
        loop = self._loop
        assert loop is not None, "the handlers are made in run()"

        def handle(subject: str, reply: str, data: bytes, raw_headers: bytes | None) -> None:
            level.last_seen = time.monotonic()
            if reply:  # a message of the stream
                if level.outstanding > 0:
                    level.outstanding -= 1
                self.held += 1
                delivery = Delivery(subject, reply, data, raw_headers)
                level.hot = delivery.num_pending > 0
                if single:
                    self._deliver(index, delivery)
                    return
                level.received.append(delivery)
                if not self._draining:
                    # After this turn of the read loop: a high message parsed behind lows goes first.
                    self._draining = True
                    loop.call_soon(self._drain)
                return
            headers = wire.parse_headers(raw_headers) if raw_headers else {}
            status = headers.get("Status")
            if status in ("408", "409"):  # the request expired or was refused: credit comes back
                pending = int(headers.get("Nats-Pending-Messages", level.outstanding))
                level.outstanding = max(0, level.outstanding - pending)
                level.hot = False
                self._wake.set()
            elif status == "404":
                level.outstanding = 0
                level.hot = False
                self._wake.set()
            # 100 (heartbeat) needs nothing: last_seen was updated.

        return handle

    def _drain(self) -> None:
        """Hand over what the read loop parsed in its last turn, highest level first."""
        self._draining = False
        while (index := self._next_received()) is not None:
            self._deliver(index, self.levels[index].received.popleft())
            self._handed += 1

    def _next_received(self) -> int | None:
        """The highest level with a received message. Every ``share_every``-th pick starts
        from the lowest level instead: a steady flow of high tasks must not hold back lows
        that were already delivered (their ack_wait is running)."""
        levels = self.levels
        order = range(len(levels))
        if self._handed % self.share_every == self.share_every - 1:
            order = order[::-1]
        for index in order:
            if levels[index].received:
                return index
        return None

    def _deliver(self, index: int, msg: Delivery) -> None:
        try:
            self.on_message(index, msg)
        except Exception:
            # Not settled: the server redelivers it after ack_wait. Its credit comes back
            # now, or a handler bug would starve this process bit by bit.
            log.exception("handling a message of %s failed; it comes back after ack_wait", self.levels[index].consumer)
            self.release()

    def _allocate(self) -> list[tuple[str, bytes, str]]:
        """Turn free capacity into pull requests: ``(subject, body, reply inbox)`` each."""
        requests: list[tuple[str, bytes, str]] = []
        free = self.free
        if self._stopped or free <= 0:
            return requests
        if len(self.levels) == 1:
            level = self.levels[0]
            # Continuous pull: top up once a quarter of the window is free, so requests stay big.
            if level.outstanding == 0 or free >= max(1, self.capacity // 4):
                requests.append(self._request(level, free, LONG_POLL_S))
            return requests
        self._rounds += 1
        order = list(range(len(self.levels)))
        if self._rounds % self.share_every == 0:
            start = 1 + (self._rounds // self.share_every) % (len(order) - 1)
            order = order[start:] + order[:start]
        if self.capacity < len(self.levels):
            return self._allocate_scarce(order, free)
        for index in order:
            if free <= 0:
                break
            level = self.levels[index]
            if level.hot:
                # The credit goes to the highest rank with a backlog, shared by its levels that have one.
                hot = [peer for peer in self._peers[index] if peer.hot]
                each, extra = divmod(free, len(hot))  # never more than the free credit in all
                for n, peer in enumerate(hot):
                    share = each + (1 if n < extra else 0)
                    if share and (peer.outstanding == 0 or share >= max(1, self.capacity // (4 * len(hot)))):
                        requests.append(self._request(peer, share, SHORT_POLL_S))
                free = 0
            elif level.outstanding == 0:
                # More than one message when there is room: under a moderate load a level is
                # often found empty, and a poll of one costs a round trip per message there
                # (at 3,300 tasks/s, submit -> started p50 3.6-4.9 ms against 5.8-9.3).
                batch = max(1, min(free, self.capacity // (IDLE_SHARE * len(self.levels))))
                requests.append(self._request(level, batch, LONG_POLL_S))
                free -= batch
        return requests

    def _allocate_scarce(self, order: list[int], free: int) -> list[tuple[str, bytes, str]]:
        """Less credit than levels: a long poll cannot wait on every level, so go round them.

        A long poll on a higher idle level would hold the only credit for seconds while a
        lower level's tasks wait. Instead a freed slot marks every level hot (see
        :meth:`release`) and the levels are asked highest first with short polls; once
        none has a backlog, brief polls take turns, so a new task on any level is seen
        within ``len(levels) * SCARCE_POLL_S``.
        """
        for index in order:
            if self.levels[index].hot:
                return [self._request(self.levels[index], free, SHORT_POLL_S)]
        requests: list[tuple[str, bytes, str]] = []
        for offset in range(len(self.levels)):
            level = self.levels[(self._rounds + offset) % len(self.levels)]
            if free > 0 and level.outstanding == 0:
                requests.append(self._request(level, 1, SCARCE_POLL_S))
                free -= 1
        return requests

    def _request(self, level: _Level, batch: int, expires_s: float) -> tuple[str, bytes, str]:
        level.outstanding += batch
        level.last_seen = time.monotonic()
        body = b'{"batch":%d,"expires":%d}' % (batch, int(expires_s * 1e9))
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{level.consumer}", body, level.inbox

    async def _probe_levels(self) -> None:
        """With less credit than levels, the brief polls go round them slowly (a worker with
        one slot and twenty task types reads sixty levels). So while none is known to have
        a backlog, every :data:`SCARCE_POLL_S` one request lists the stream's consumers with
        their pending counts (:meth:`probe`)."""
        while True:
            await asyncio.sleep(SCARCE_POLL_S)
            # Credit in brief polls still counts as free here: they expire within SCARCE_POLL_S.
            if self._stopped or self.held >= self.capacity or any(level.hot for level in self.levels):
                continue
            try:
                if await self.probe():
                    self._wake.set()
            except Exception as exc:  # noqa: BLE001 - disconnected or slow: the brief polls go on meanwhile
                log.debug("listing the consumers of %s failed: %r", self.stream, exc)

    async def probe(self) -> bool:
        """Mark the levels whose consumers have messages to deliver; True when any has."""
        found = False
        pending = await _pending_by_consumer(self.bus, self.stream)
        for level in self.levels:
            if pending.get(level.consumer, 0) > 0:
                level.hot = found = True
        return found

    async def _watch_requests(self) -> None:
        """Once a second: a request the server never answered (restart, lost connection)
        frees its credit."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for level in self.levels:
                if level.outstanding and now - level.last_seen > LONG_POLL_S + 2.0:
                    log.info("pull requests on %s went unanswered; asking again", level.consumer)
                    level.outstanding = 0
                    level.hot = True
                    self._wake.set()


class _ConsumerFilter(msgspec.Struct, frozen=True):
    filter_subject: str = ""


class ConsumerLoad(msgspec.Struct, frozen=True):
    """One consumer's counts, as ``$JS.API.CONSUMER.LIST`` gives them."""

    name: str
    num_pending: int = 0
    """Messages it could deliver now."""
    num_ack_pending: int = 0
    """Messages delivered and not acked yet."""
    config: _ConsumerFilter = msgspec.field(default_factory=_ConsumerFilter)

    @property
    def filter_subject(self) -> str:
        return self.config.filter_subject


class _ConsumerList(msgspec.Struct):
    consumers: list[ConsumerLoad] | None = None
    total: int = 0
    limit: int = 0


_decode_consumer_list = msgspec.json.Decoder(_ConsumerList).decode


async def consumer_loads(bus: Bus, stream: str) -> list[ConsumerLoad]:
    """Every consumer of ``stream`` with its counts (page by page: one request per 256)."""
    found: dict[str, ConsumerLoad] = {}
    while True:
        reply = await bus.nc.request(f"$JS.API.CONSUMER.LIST.{stream}", b'{"offset":%d}' % len(found), timeout=2.0)
        page = _decode_consumer_list(reply.data)
        for consumer in page.consumers or ():
            found[consumer.name] = consumer
        if not page.consumers or len(found) >= page.total:
            return list(found.values())


async def _pending_by_consumer(bus: Bus, stream: str) -> dict[str, int]:
    """Every consumer of ``stream`` with the messages it could deliver now."""
    return {consumer.name: consumer.num_pending for consumer in await consumer_loads(bus, stream)}
