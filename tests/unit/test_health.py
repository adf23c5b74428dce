"""A role's probes: liveness fails once the event loop stops beating, readiness needs the roles
built, and the probe paths are answered in front of the metrics app, which keeps the rest."""

from __future__ import annotations

import json
import time
from typing import Any

from streamsched.roles.health import Health, with_probes


def call(app: Any, path: str) -> tuple[str, dict[str, Any] | bytes]:
    """``app``'s status and body (JSON decoded, when it is) for a GET of ``path``."""
    seen: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen.append(status)
        return lambda data: None

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response))
    try:
        return seen[0], json.loads(body)
    except ValueError:
        return seen[0], body


def metrics_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"metrics of " + environ["PATH_INFO"].encode()]


def test_liveness_fails_once_the_loop_has_not_beaten_for_the_stall_limit() -> None:
    health = Health(stalled_s=5.0)
    app = with_probes(metrics_app, health)
    assert call(app, "/health") == ("200 OK", {"status": "ok", "detail": "ok"})
    health.last_beat = time.monotonic() - 6.0  # the loop stuck for 6 s
    status, body = call(app, "/health")
    assert status.startswith("503") and isinstance(body, dict)
    assert "has not turned" in body["detail"]
    assert call(app, "/ready")[0].startswith("503")  # a stuck loop is not ready either


def test_readiness_waits_for_the_roles_and_other_paths_reach_the_metrics() -> None:
    app = with_probes(metrics_app, Health())
    status, body = call(app, "/ready")
    assert status.startswith("503") and isinstance(body, dict) and body["detail"].startswith("starting")
    assert call(app, "/metrics") == ("200 OK", b"metrics of /metrics")
    assert call(app, "/healthz") == ("200 OK", b"metrics of /healthz")  # only the exact paths are probes
