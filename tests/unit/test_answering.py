"""Steps asked again while JetStream cannot answer, for a bounded time."""

from __future__ import annotations

import anyio
import nats.errors
import pytest
from nats.js.errors import NotFoundError, ServiceUnavailableError

from streamsched.transport import answering

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def short_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(answering, "FIRST_PAUSE_S", 0.01)


async def test_a_step_is_asked_again_until_jetstream_answers():
    failures = [nats.errors.TimeoutError(), ServiceUnavailableError(), nats.errors.NoRespondersError()]
    calls = 0

    async def step() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "answered"

    assert await answering.when_answered(step, "in a test") == "answered"
    assert calls == 4


async def test_the_error_is_raised_once_the_time_is_up():
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        raise nats.errors.TimeoutError

    with anyio.fail_after(5), pytest.raises(nats.errors.TimeoutError):
        await answering.when_answered(step, "in a test", retry_for_s=0.1)
    assert calls >= 2


async def test_an_answer_that_is_an_error_is_not_asked_again():
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        raise NotFoundError

    with pytest.raises(NotFoundError):
        await answering.when_answered(step, "in a test")
    assert calls == 1
