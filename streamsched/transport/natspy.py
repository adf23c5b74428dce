"""What :mod:`streamsched.transport.wire` borrows from nats-py, checked, and its other route.

The fast path of ``wire`` reads and writes nats-py's private parts. :func:`missing_pieces`
checks, on a real client, that each is there in the shape it expects. Where one is not,
``wire`` falls back to nats-py's public API, through the two functions here:
:func:`publish_now` (a publish that stays synchronous and in order, as ``wire.send`` is)
and :func:`subscribe` (a plain callback per message).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
from collections.abc import Callable, Coroutine, Generator
from typing import Any

from nats import errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import parser as nats_parser
from nats.protocol.parser import Parser

log = logging.getLogger("streamsched.wire")

#: The client's attributes the fast path reads and writes, with the types it expects.
CLIENT_FIELDS: dict[str, tuple[type, ...]] = {
    "_ps": (Parser,),
    "_pending": (list,),
    "_pending_data_size": (int,),
    "_max_pending_size": (int,),
    "_max_payload": (int,),
    "_flush_queue": (asyncio.Queue, type(None)),  # None until connected
    "stats": (dict,),
}
#: The parser's state, carried over to the fast parser.
PARSER_FIELDS: dict[str, tuple[type, ...]] = {
    "buf": (bytearray,),
    "state": (int,),
    "needed": (int,),
    "header_needed": (int,),
    "msg_arg": (dict,),
}
#: The counters of ``Client.stats`` that the fast path keeps as nats-py does.
STATS_KEYS = ("in_msgs", "in_bytes", "out_msgs", "out_bytes")
#: The client's coroutines the fast parser calls, with the number of arguments it passes.
CLIENT_DISPATCH = {"_process_msg": 5, "_process_err": 1, "_process_ping": 0, "_process_pong": 0, "_process_info": 1}
#: The control-line regexes of nats-py's parser module, with the groups the fast parser reads.
CONTROL_PATTERNS = {"OK_RE": 0, "ERR_RE": 1, "PING_RE": 0, "PONG_RE": 0, "INFO_RE": 1}


def missing_pieces(nc: Client) -> list[str]:
    """What the fast path relies on that this client (or its nats-py) lacks or has in
    another shape, one description each; empty when the fast path can run."""
    missing: list[str] = []

    def expect(owner: object, label: str, fields: dict[str, tuple[type, ...]]) -> None:
        for name, kinds in fields.items():
            if not hasattr(owner, name) or not isinstance(getattr(owner, name), kinds):
                missing.append(f"{label}.{name} ({' or '.join(kind.__name__ for kind in kinds)})")

    expect(nc, "Client", CLIENT_FIELDS)
    parser = getattr(nc, "_ps", None)
    if type(parser) is Parser:  # exactly nats-py's own, whose state the fast parser takes over
        expect(parser, "Parser", PARSER_FIELDS)
    stats = getattr(nc, "stats", None)
    if isinstance(stats, dict):
        missing += [f"Client.stats[{key!r}] (int)" for key in STATS_KEYS if not isinstance(stats.get(key), int)]
    for name, arity in CLIENT_DISPATCH.items():
        if not _is_coroutine_taking(getattr(nc, name, None), arity):
            missing.append(f"Client.{name} (a coroutine taking {arity} arguments)")
    if not _is_coroutine_taking(getattr(Parser, "parse", None), 2):  # (self, data)
        missing.append("Parser.parse (a coroutine taking the data)")
    if not callable(getattr(Parser, "reset", None)):  # a reconnect resets the parser
        missing.append("Parser.reset")
    for name, groups in CONTROL_PATTERNS.items():
        pattern = getattr(nats_parser, name, None)
        if not (isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, bytes) and pattern.groups >= groups):
            missing.append(f"nats.protocol.parser.{name} (a bytes regex with {groups} groups)")
    for name in ("AWAITING_CONTROL_LINE", "MAX_CONTROL_LINE_SIZE"):
        if not isinstance(getattr(nats_parser, name, None), int):
            missing.append(f"nats.protocol.parser.{name} (int)")
    try:  # the id is the sid the server echoes in MSG: the key of the fast handlers
        sid_kept = getattr(Subscription(nc, 7), "_id", None) == 7
    except Exception:  # noqa: BLE001 - a constructor of another shape is a missing piece too
        sid_kept = False
    if not sid_kept:
        missing.append("Subscription._id (the subscription id)")
    return missing


def _is_coroutine_taking(function: object, arity: int) -> bool:
    if not inspect.iscoroutinefunction(function):
        return False
    try:
        inspect.signature(function).bind(*range(arity))
    except (TypeError, ValueError):
        return False
    return True


#: Publishes of a connection queued behind one of its own that paused, by ``id(nc)``:
#: an entry lives only while the task that drains it, which holds the client, runs.
_paused: dict[int, collections.deque[tuple[str, bytes, str, dict[str, str] | None]]] = {}
#: The tasks that finish a paused publish and drain its queue.
_finishing: set[asyncio.Task[None]] = set()


def publish_now(nc: Client, subject: str, payload: bytes, reply: str, headers: dict[str, str] | None) -> None:
    """``nc.publish``, run at once up to its first pause instead of awaited.

    In nats-py 2.16 ``publish`` pauses only to wait for a flush when its write buffer is
    over ``pending_size``: run now, it appends the message to the buffer and raises (a
    closed client, a bad subject) right here, as the fast path does. If it does pause, a
    task finishes it, and the connection's later publishes queue behind it, so that
    their order holds.
    """
    backlog = _paused.get(id(nc))
    if backlog is not None:
        if nc.is_closed:
            raise errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise errors.ConnectionDrainingError
        backlog.append((subject, payload, reply, headers))
        return
    publishing = nc.publish(subject, payload, reply=reply, headers=headers)
    try:
        pause = publishing.send(None)
    except StopIteration:
        return
    backlog = _paused[id(nc)] = collections.deque()
    task = asyncio.get_running_loop().create_task(_finish_paused(nc, publishing, pause, backlog))
    _finishing.add(task)  # the loop keeps tasks only weakly
    task.add_done_callback(_finishing.discard)


async def _finish_paused(
    nc: Client,
    publishing: Coroutine[Any, Any, None],
    pause: Any,
    backlog: collections.deque[tuple[str, bytes, str, dict[str, str] | None]],
) -> None:
    try:
        try:
            await _Resumed(publishing, pause)
        except Exception:
            log.exception("publish through nats-py failed")
        while backlog:
            subject, payload, reply, headers = backlog.popleft()
            try:
                await nc.publish(subject, payload, reply=reply, headers=headers)
            except Exception:
                log.exception("publish to %s through nats-py failed", subject)
    finally:
        del _paused[id(nc)]


class _Resumed:
    """Awaiting this finishes a coroutine that already ran up to a pause, where it
    yielded ``pause`` (a future, or None for a bare yield): the awaiting task waits on
    that first, as it would have for the coroutine itself, then runs the rest."""

    def __init__(self, coroutine: Coroutine[Any, Any, None], pause: Any) -> None:
        self.coroutine = coroutine
        self.pause = pause

    def __await__(self) -> Generator[Any, None, None]:
        yield self.pause
        yield from self.coroutine.__await__()


async def subscribe(nc: Client, subject: str, deliver: Callable[[Msg], None]) -> Subscription:
    """A nats-py subscription whose messages go to ``deliver``, from its callback task."""

    async def callback(msg: Msg) -> None:
        try:
            deliver(msg)
        except Exception:
            log.exception("handler for %s failed", msg.subject)

    # No limits: the fast path has none, and a dropped pull delivery would wait for redelivery.
    return await nc.subscribe(subject, cb=callback, pending_msgs_limit=0, pending_bytes_limit=0)
