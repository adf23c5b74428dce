"""Requests answered by many messages (batched direct gets) share one reply subscription."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streamsched import subjects
from streamsched.eventlog.state import last_values
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio


async def test_concurrent_direct_gets_each_get_their_own_answers_through_one_subscription(bus: Bus, monkeypatch: pytest.MonkeyPatch):
    stream = f"KV_{subjects.DEPENDANTS_BUCKET}"
    for dependency in ("a", "b", "c"):
        for dependant in range(3):
            await (await bus.publish(f"$KV.{subjects.DEPENDANTS_BUCKET}.{dependency}.{dependency}{dependant}", b""))
    await last_values(bus, stream, ["$KV.dependants.a.*"])  # the shared subscription exists from here on
    subscribed: list[str] = []
    subscribe = bus.nc.subscribe

    async def counted(subject: str, *args: Any, **kwargs: Any) -> Any:
        subscribed.append(subject)
        return await subscribe(subject, *args, **kwargs)

    monkeypatch.setattr(bus.nc, "subscribe", counted)
    found = await asyncio.gather(*(last_values(bus, stream, [f"$KV.dependants.{d}.*"]) for d in ("a", "b", "c", "none") * 5))
    for answer, dependency in zip(found, ("a", "b", "c", "none") * 5, strict=True):
        assert answer is not None
        expected = [] if dependency == "none" else [f"$KV.dependants.{dependency}.{dependency}{i}" for i in range(3)]
        assert sorted(subject for subject, _seq, _data in answer) == expected
    assert subscribed == [], "no subscription per request"


async def _answered(bus: Bus, got: list[bytes], message: bytes) -> str:
    """Send ``message`` to a reply subject of its own and wait until it came back; returns the subject."""
    async with bus.reply_subject(lambda _s, _r, data, _h: got.append(data)) as inbox:
        await bus.nc.publish(inbox, message)
        for _ in range(500):  # back through the server: bounded wait
            if message in got:
                return inbox
            await asyncio.sleep(0.01)
    raise AssertionError(f"{message!r} never came back")


async def test_an_answer_after_its_block_ended_is_dropped(bus: Bus):
    got: list[bytes] = []
    ended = await _answered(bus, got, b"in time")
    await bus.nc.publish(ended, b"late")
    # Messages of one subscription arrive in order: once this one is back, "late" was handled.
    await _answered(bus, got, b"after")
    assert got == [b"in time", b"after"]
