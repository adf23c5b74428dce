"""Asking JetStream again while it cannot answer: a server restarting, a cluster electing a leader.

A role's first requests (a bucket looked up, a watch started) may fall into the seconds a
cluster needs to elect a new leader after losing a node. Failing there would end the whole
process for a pause that heals by itself, and its restart would only wait again; so these
steps are asked again, for a bounded time, and only then fail (and a supervisor restarts
the role).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import nats.errors
from nats.js.errors import ServiceUnavailableError

log = logging.getLogger("streamsched.answering")

T = TypeVar("T")

#: What a JetStream request raises while a server restarts or a cluster elects a leader:
#: worth asking again.
NOT_ANSWERING = (ServiceUnavailableError, nats.errors.TimeoutError, nats.errors.NoRespondersError)
#: Longest a step is asked again before its error is raised.
RETRY_FOR_S = 60.0
#: The pause after the first failure; it doubles up to :data:`MAX_PAUSE_S`.
FIRST_PAUSE_S = 0.2
MAX_PAUSE_S = 5.0


async def when_answered(step: Callable[[], Awaitable[T]], what: str, *, retry_for_s: float = RETRY_FOR_S) -> T:
    """``step()``, asked again while JetStream does not answer (:data:`NOT_ANSWERING`), for
    up to ``retry_for_s``; ``what`` names the step in the log line."""
    deadline = anyio.current_time() + retry_for_s
    pause = FIRST_PAUSE_S
    while True:
        try:
            return await step()
        except NOT_ANSWERING as exc:
            if anyio.current_time() + pause > deadline:
                raise
            log.warning("JetStream did not answer %s (%r); asking again in %.1fs", what, exc, pause)
            await anyio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE_S)
