"""Parsing --since and formatting event lines."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec
import pytest

from streamsched.eventlog import events as ev
from streamsched.eventlog.reader import Record, format_record
from streamsched.transport.reading import Since


def test_since_takes_a_sequence_a_duration_or_a_time():
    assert Since.parse("1234") == Since(seq=1234)
    assert Since.parse(None) == Since(seq=1)
    ten_minutes_ago = Since.parse("10m").time
    assert ten_minutes_ago is not None and abs(ten_minutes_ago.timestamp() - (time.time() - 600)) < 5
    assert Since.parse("1.5h").time.timestamp() == pytest.approx(time.time() - 5400, abs=5)
    assert Since.parse("2026-11-23T10:00:00Z").time == datetime(2026, 11, 23, 10, tzinfo=UTC)
    assert Since.parse("2026-11-23T10:00:00").time.tzinfo is UTC


@pytest.mark.parametrize("bad", ["yesterday", "10x", "-5m", "2026-13-01"])
def test_since_refuses_what_it_cannot_read_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="expected a duration"):
        Since.parse(bad)


def test_a_record_line_shows_time_sequence_task_kind_and_the_facts():
    first = Record(7, 0.0, ev.Started(task_id="t1", at=100.0, attempt=2, worker="w1", region="eu"))
    second = Record(9, 0.0, ev.Succeeded(task_id="t1", at=100.25, attempt=2, result=msgspec.Raw(b'{"ok":1}'), duration_s=0.25))
    line = format_record(second, first)
    assert "#9" in line and "t1" in line and "succeeded" in line
    assert "+    250.0 ms" in line and "attempt=2" in line and 'result={"ok":1}' in line
    assert "worker=w1" in format_record(first) and "region=eu" in format_record(first)
