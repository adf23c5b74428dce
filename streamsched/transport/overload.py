"""Publishes refused because a stream is full: recognised, tried again within a budget, named.

A stream that discards new messages at a limit (TASKS, SCHED, WORK, FINISHED, KV ``tasks``)
answers a publish past it with a JetStream error and stores nothing; it never evicts what
it holds. nats-server 2.15 answers (status 503 each):

* ``10077`` with ``maximum bytes exceeded``, ``maximum messages exceeded`` or
  ``maximum messages per subject exceeded``: the stream's own limit;
* ``10023 insufficient resources``: the server's (or the account's) JetStream storage is
  full, whatever the stream's limits.

Such a refusal is definite, so sending the same message again is safe, and a stored copy
is never made twice anyway: nats-server checks ``Nats-Msg-Id`` before the limits, so a
message it holds already is answered as a duplicate even while the stream is full.
:func:`publish` and :func:`retry_while_full` try again with exponential backoff and
jitter until a budget is spent, then raise :class:`~streamsched.errors.Overloaded`. Any
other error is raised at once, untouched: a timeout or a lost connection says nothing of
whether the message was stored, and the caller decides.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from nats.errors import Error as NatsError
from nats.js.errors import APIError

from ..errors import SERVER_STORAGE, Overloaded
from .bus import Bus
from .streams import LIMIT_SETTINGS

T = TypeVar("T")

#: nats-server's error code for a message a stream's store refused (at a limit, among others).
STORE_FAILED = 10077
#: nats-server's error code for JetStream storage that is full server- or account-wide.
INSUFFICIENT_RESOURCES = 10023
#: The stream config field behind each description nats-server gives with :data:`STORE_FAILED`.
LIMIT_OF_DESCRIPTION = {
    "maximum bytes exceeded": "max_bytes",
    "maximum messages exceeded": "max_msgs",
    "maximum messages per subject exceeded": "max_msgs_per_subject",
}
#: First pause before trying again, and the longest: each pause doubles, jittered to half to all of it.
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 1.0
#: Seconds the names and values for :class:`~streamsched.errors.Overloaded` may take to look up.
LOOKUP_TIMEOUT_S = 2.0


def refused_at(error: BaseException | None) -> str | None:
    """The limit ``error`` says a full stream refused the message at (a stream config field, or
    :data:`~streamsched.errors.SERVER_STORAGE`); ``None`` for any other error."""
    if not isinstance(error, APIError):
        return None
    if error.err_code == INSUFFICIENT_RESOURCES:
        return SERVER_STORAGE
    if error.err_code == STORE_FAILED:
        return LIMIT_OF_DESCRIPTION.get(error.description or "")
    return None


def is_full(error: BaseException | None) -> bool:
    """True when ``error`` is a publish refused because a stream (or the server's storage) is full."""
    return refused_at(error) is not None


class Backoff:
    """Pauses between tries, doubling from :data:`FIRST_DELAY_S` up to :data:`MAX_DELAY_S`,
    each jittered (so that many clients refused at once do not come back at once), until
    ``budget_s`` has passed since it was made."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.delay_s = FIRST_DELAY_S

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def spent(self) -> str:
        """What the tries came to, for the error's message."""
        if self.deadline <= self.started:
            return "not retried (submit_retry_budget_s is 0)"
        return f"still full after {self.elapsed_s:.1f} s of retries (submit_retry_budget_s)"

    async def wait(self) -> bool:
        """Sleep before the next try (the last one comes at the deadline); ``False``, at
        once, when the budget is spent."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        await anyio.sleep(min(remaining, random.uniform(self.delay_s / 2, self.delay_s)))
        self.delay_s = min(self.delay_s * 2, MAX_DELAY_S)
        return True


async def overloaded(bus: Bus, error: BaseException, subject: str | None, *, detail: str = "") -> Overloaded:
    """The :class:`~streamsched.errors.Overloaded` for ``error`` (a refusal, see :func:`refused_at`),
    naming the stream that takes ``subject``, the limit with its value as the server has it,
    and the setting behind it. Looking them up costs two API round trips, on this path only;
    what cannot be looked up is left out."""
    limit = refused_at(error) or "a limit"
    stream: str | None = None
    value: int | None = None
    if subject is not None:
        try:
            with anyio.move_on_after(LOOKUP_TIMEOUT_S):
                stream = await bus.js.find_stream_name_by_subject(subject)
                if limit != SERVER_STORAGE:
                    config: Any = (await bus.js.stream_info(stream)).config
                    value = getattr(config, limit, None)
        except (NatsError, TimeoutError):  # the error is what matters; its details are a courtesy
            pass
    setting = LIMIT_SETTINGS.get((stream, limit)) if stream is not None else None
    return Overloaded(stream, limit, value=value, setting=setting, detail=detail)


async def retry_while_full(bus: Bus, budget_s: float, attempt: Callable[[], Awaitable[T]], subject: str | None) -> T:
    """``await attempt()``, again after each pause of a :class:`Backoff` while it raises a
    full stream's refusal; past ``budget_s`` raises :class:`~streamsched.errors.Overloaded`
    (naming the stream of ``subject``). Any other error propagates at once."""
    backoff: Backoff | None = None
    while True:
        try:
            return await attempt()
        except APIError as exc:
            if not is_full(exc):
                raise
            backoff = backoff or Backoff(budget_s)
            if not await backoff.wait():
                raise await overloaded(bus, exc, subject, detail=backoff.spent()) from exc


async def publish(bus: Bus, subject: str, body: bytes, headers: dict[str, str], budget_s: float) -> Any:
    """A JetStream publish awaiting its PubAck, tried again while a full stream refuses it
    (see :func:`retry_while_full`); ``headers`` should hold a ``Nats-Msg-Id``, which every
    try carries, so that nothing is stored twice however the tries went."""
    return await retry_while_full(bus, budget_s, lambda: bus.js.publish(subject, body, headers=headers), subject)
