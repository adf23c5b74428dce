"""A role process's /health and /ready, as Kubernetes probes them: alive from the start,
ready once connected with its pullers running, not ready while NATS is gone and ready again
when it is back, alive all along."""

from __future__ import annotations

import contextlib
import time

import anyio
import httpx
import pytest

from streamsched.transport.bus import Bus
from streamsched.transport.server import NatsServer, free_port

from .conftest import Processes

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def probe_until(http: httpx.AsyncClient, url: str, status: int, processes: Processes, timeout_s: float = 20.0) -> dict[str, str]:
    """GET ``url`` until it answers ``status``; its JSON body."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            answer = await http.get(url)
            if answer.status_code == status:
                body: dict[str, str] = answer.json()
                return body
            last = f"{answer.status_code} {answer.text}"
        await anyio.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s}s (last: {last})\n{processes.logs()}")


async def test_a_role_is_alive_throughout_and_ready_only_while_connected_and_pulling(server: NatsServer, bus: Bus, processes: Processes):
    port, waiting_port = free_port(), free_port()
    base, waiting = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{waiting_port}"
    processes.start("regional", "regional", "--region", "default", "--metrics-port", str(port))
    # A role whose NATS is not up yet: alive, and not ready while it waits to connect.
    nowhere = f"nats://127.0.0.1:{free_port()}"
    processes.start("waiting", "regional", "--region", "default", "--metrics-port", str(waiting_port), env={"NATS_URL": nowhere})
    async with httpx.AsyncClient(timeout=2) as http:
        assert (await probe_until(http, f"{waiting}/health", 200, processes))["status"] == "ok"
        starting = await probe_until(http, f"{waiting}/ready", 503, processes)
        assert starting["detail"].startswith("starting"), starting

        assert (await probe_until(http, f"{base}/ready", 200, processes))["detail"] == "ready"
        assert "regional_released_total" in (await http.get(f"{base}/metrics")).text  # the roles' collectors joined

        server.stop()
        gone = await probe_until(http, f"{base}/ready", 503, processes)
        assert "not connected to NATS" in gone["detail"], gone
        assert (await http.get(f"{base}/health")).status_code == 200

        server.start()  # the same port and store
        await probe_until(http, f"{base}/ready", 200, processes)
