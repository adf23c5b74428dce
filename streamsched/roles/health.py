"""A role process's ``/health`` and ``/ready``, for Kubernetes' probes, beside its ``/metrics``.

* ``/health`` (liveness): the process's event loop still turns. A beat task stamps the time
  every :data:`BEAT_S`; the endpoint, on the HTTP server's own thread, answers 200 while the
  last stamp is younger than :data:`STALLED_S`, and 503 once it is older (a loop stuck in a
  blocking call or a busy loop: only a restart helps).
* ``/ready`` (readiness): connected to NATS and every role's puller keeps its pull requests
  outstanding. 503 while the process connects and builds its roles, while NATS is away (the
  client reconnects by itself) and once a shutdown stopped the pullers.

Both answer a small JSON body saying why. Nothing here is on a task's path: the beat is one
timer a second, and the checks run when a probe asks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from ..transport.bus import Bus
    from ..transport.pull import Puller

#: How often the event loop stamps its beat.
BEAT_S = 1.0
#: A beat older than this means the loop has stopped turning: liveness fails. Ten beats, so
#: a loop that is merely busy (a burst of tasks, a full garbage collection) still passes.
STALLED_S = 10.0


class Health:
    """What the probes read: the loop's last beat, and (once the roles are built) whether the
    connection is up and the pullers run. Written on the event loop, read on the HTTP
    server's thread: single attribute reads and writes, which need no lock."""

    def __init__(self, stalled_s: float = STALLED_S) -> None:
        self.stalled_s = stalled_s
        self.last_beat = time.monotonic()
        self._connected: Callable[[], bool] | None = None
        self._pullers: Sequence[Puller] = ()

    async def beat(self) -> None:
        """Stamp the time every :data:`BEAT_S`, until cancelled."""
        while True:
            self.last_beat = time.monotonic()
            await anyio.sleep(BEAT_S)

    def watch(self, bus: Bus, roles: Sequence[Any]) -> None:
        """From now on readiness is ``bus`` connected and the pullers of ``roles`` running."""
        self._pullers = pullers_of(roles)
        self._connected = lambda: bus.nc.is_connected

    def alive(self) -> tuple[bool, str]:
        """``(alive, why)``: the loop beat within ``stalled_s``."""
        age = time.monotonic() - self.last_beat
        if age > self.stalled_s:
            return False, f"the event loop has not turned for {age:.1f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """``(ready, why)``: connected to NATS, every puller running (and the loop alive)."""
        alive, why = self.alive()
        if not alive:
            return False, why
        if self._connected is None:
            return False, "starting: connecting to NATS and building the roles"
        if not self._connected():
            return False, "not connected to NATS (reconnecting)"
        stopped = [puller.stream for puller in self._pullers if not puller.running]
        if stopped:
            return False, f"not pulling from {', '.join(stopped)} (starting or shutting down)"
        return True, "ready"


def pullers_of(roles: Sequence[Any]) -> list[Puller]:
    """The credit puller of each role that has one (every kind a role command runs does)."""
    from .master import Master
    from .projector import Projector
    from .regional import Regional
    from .worker import Worker

    return [role.puller for role in roles if isinstance(role, Master | Regional | Worker | Projector)]


#: The paths :func:`with_probes` answers itself, and the check each one runs.
PROBES: dict[str, Callable[[Health], tuple[bool, str]]] = {"/health": Health.alive, "/ready": Health.ready}


def with_probes(app: WSGIApplication, health: Health) -> WSGIApplication:
    """``app`` (the metrics) with ``/health`` and ``/ready`` answered in front of it."""

    def routed(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        check = PROBES.get(environ.get("PATH_INFO", ""))
        if check is None:
            return app(environ, start_response)
        ok, why = check(health)
        body = json.dumps({"status": "ok" if ok else "unavailable", "detail": why}).encode()
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    return routed
