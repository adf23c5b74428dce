"""Aging's setting and the stored times it reads."""

import pytest

from streamsched.config import ConfigError, Settings
from streamsched.transport.direct import _own, _unix


def test_aging_is_off_by_default_and_takes_zero_or_at_least_a_tenth_of_a_second() -> None:
    assert Settings().aging_s == 0
    assert Settings(aging_s=2.5).aging_s == 2.5
    for bad in (0.05, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="aging_s"):
            Settings(aging_s=bad).check()


def test_a_stored_time_with_nanoseconds_reads_as_unix_seconds() -> None:
    assert _unix("2026-12-04T14:12:11.123456789Z") == pytest.approx(1796393531.123456789, abs=1e-6)
    assert _unix("2026-12-04T14:12:11Z") == pytest.approx(1796393531.0)
    assert _unix("") == 0.0


def test_a_direct_get_answer_keeps_only_the_message_s_own_headers() -> None:
    raw = b"NATS/1.0\r\nNats-Stream: WORK\r\nStreamsched-Task-Id: t1\r\nNats-Sequence: 7\r\nNats-Time-Stamp: x\r\n\r\n"
    assert _own(raw) == b"NATS/1.0\r\nStreamsched-Task-Id: t1\r\n\r\n"
