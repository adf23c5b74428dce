"""Who may reach the APIs: a command refuses to listen beyond this machine without a token."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from streamsched.cli import app


@pytest.mark.parametrize("command", [["grpc"], ["api"], ["up", "--api-port", "8080"]])
@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_a_host_other_than_loopback_is_refused_without_a_token(command: list[str], host: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("STREAMSCHED_API_TOKEN", raising=False)
    flag = "--api-host" if command[0] == "up" else "--host"
    result = CliRunner().invoke(app, [*command, flag, host])
    assert result.exit_code == 2 and "loopback only" in result.output and host in result.output
