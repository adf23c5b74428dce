"""Roles run on uvloop unless the settings say asyncio; a bad choice is a clear error."""

from __future__ import annotations

import pytest

from streamsched.config import Settings
from streamsched.errors import ConfigError
from streamsched.roles import service


def backend_options(monkeypatch, settings: Settings) -> dict:
    seen: dict = {}
    monkeypatch.setattr(service.anyio, "run", lambda *args, backend_options: seen.update(backend_options))
    service.run_service(settings, "test", lambda bus: None)
    return seen


def test_roles_run_on_uvloop_by_default_and_on_asyncio_when_asked(monkeypatch):
    pytest.importorskip("uvloop")  # a dependency everywhere but Windows
    assert backend_options(monkeypatch, Settings.load({})) == {"use_uvloop": True}
    assert backend_options(monkeypatch, Settings.load({}, event_loop="asyncio")) == {"use_uvloop": False}


def test_without_uvloop_installed_the_roles_fall_back_to_asyncio(monkeypatch):
    monkeypatch.setattr(service.importlib.util, "find_spec", lambda name: None)
    assert backend_options(monkeypatch, Settings.load({})) == {"use_uvloop": False}


def test_an_unknown_event_loop_is_refused():
    with pytest.raises(ConfigError, match="event_loop must be uvloop or asyncio"):
        Settings.load({}, event_loop="trio")
