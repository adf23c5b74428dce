"""How the puller turns free capacity into pull requests (pure logic, no server)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from streamsched.transport.pull import Puller


class _NoNetwork:
    """Just enough of a Bus for a Puller to be built; nothing is sent in these tests."""

    nc = SimpleNamespace(new_inbox=lambda: "_INBOX.test")

    def on_reconnect(self, _callback) -> None:
        pass


def puller(capacity: int, levels: int = 3) -> Puller:
    return Puller(_NoNetwork(), "WORK", [f"c{i}" for i in range(levels)], capacity, lambda level, msg: None)


def requests(p: Puller) -> list[tuple[str, int]]:
    return [(subject.rsplit(".", 1)[1], json.loads(body)["batch"]) for subject, body, _ in p._allocate()]


def test_all_free_capacity_goes_to_the_highest_level_with_a_backlog():
    p = puller(10)
    assert requests(p) == [("c0", 10)]
    assert p.free == 0


def test_idle_levels_keep_a_one_message_long_poll_so_new_work_is_seen_at_once():
    p = puller(10)
    for level in p.levels:
        level.hot = False
    assert requests(p) == [("c0", 1), ("c1", 1), ("c2", 1)]
    assert p.free == 7


def test_with_room_idle_levels_poll_for_a_few_messages_a_quarter_of_the_capacity_at_most():
    p = puller(64)
    for level in p.levels:
        level.hot = False
    assert requests(p) == [("c0", 5), ("c1", 5), ("c2", 5)]  # 64 // (4 * 3)
    p = puller(2000)
    p.levels[0].hot = p.levels[1].hot = False
    assert requests(p) == [("c0", 166), ("c1", 166), ("c2", 1668)]  # the backlog gets the rest


def test_a_lower_backlog_gets_the_rest_when_higher_levels_are_idle():
    p = puller(10)
    p.levels[0].hot = p.levels[1].hot = False
    assert requests(p) == [("c0", 1), ("c1", 1), ("c2", 8)]


def test_credit_never_exceeds_capacity_minus_held_messages():
    p = puller(4)
    p.held = 3
    assert requests(p) == [("c0", 1)]
    assert requests(p) == []  # nothing free until a release
    p.release(2)
    assert sum(batch for _, batch in requests(p)) <= 2
    assert p.held + sum(level.outstanding for level in p.levels) <= 4


def test_lower_levels_get_a_small_share_while_the_top_level_is_saturated():
    p = puller(8, levels=2)
    served = {"c0": 0, "c1": 0}
    for _ in range(80):
        for level in p.levels:
            level.outstanding = 0  # every request answered in full
        for consumer, batch in requests(p):
            served[consumer] += batch
    assert served["c1"] > 0
    assert served["c0"] > 5 * served["c1"]


def test_a_reconnect_forgets_requests_the_server_no_longer_has():
    p = puller(6)
    requests(p)
    assert p.free == 0
    p.reset()
    assert p.free == 6


def test_with_less_capacity_than_levels_a_free_slot_asks_every_level_highest_first():
    p = puller(1)
    for expected in ("c0", "c1", "c2"):
        assert requests(p) == [(expected, 1)]
        asked = next(level for level in p.levels if level.outstanding)
        asked.outstanding, asked.hot = 0, False  # answered 408: nothing there
    p.held = 1  # c2 had a message after all
    p.release()
    assert requests(p) == [("c0", 1)]  # the next free slot starts from the top again


def test_with_less_capacity_than_levels_idle_levels_take_turns_with_brief_polls():
    p = puller(1)
    for level in p.levels:
        level.hot = False
    asked = []
    for _ in range(3):
        [(subject, body, _)] = p._allocate()
        asked.append(subject.rsplit(".", 1)[1])
        assert json.loads(body)["expires"] < 1e9  # not a 5 s long poll holding the only slot
        for level in p.levels:
            level.outstanding = 0  # the poll expired
    assert sorted(asked) == ["c0", "c1", "c2"]


REPLY = "$JS.ACK.WORK.c{level}.1.{seq}.{seq}.1732412345123456789.{pending}"


def deliver(p: Puller, level: int, seq: int, pending: int = 0) -> None:
    """What the read loop does for a message of ``level`` parsed from the socket."""
    p._handler(level)(f"work.r.{level}", REPLY.format(level=level, seq=seq, pending=pending), b"{}", None)


@pytest.mark.anyio
async def test_messages_parsed_in_one_read_are_handed_over_highest_level_first():
    handed: list[tuple[int, int]] = []
    p = Puller(_NoNetwork(), "WORK", ["c0", "c1", "c2"], 100, lambda level, msg: handed.append((level, msg.stream_seq)))
    p._loop = asyncio.get_running_loop()
    for seq in range(1, 4):
        deliver(p, 2, seq, pending=5)
    deliver(p, 0, 4)  # a high message parsed behind three lows
    assert handed == []  # nothing yet: handed over once the read is done
    await asyncio.sleep(0)
    assert handed == [(0, 4), (2, 1), (2, 2), (2, 3)]
    assert p.held == 4 and p.levels[2].hot and not p.levels[0].hot


@pytest.mark.anyio
async def test_a_handler_that_fails_gives_its_credit_back(caplog):
    def broken(level: int, msg: object) -> None:
        raise RuntimeError("handler bug")

    p = Puller(_NoNetwork(), "WORK", ["c0"], 4, broken)
    p._loop = asyncio.get_running_loop()
    deliver(p, 0, 1)  # one level: handed over at once, from the read loop
    assert p.held == 0 and p.free == 4  # not settled (it comes back after ack_wait), but not leaked
    assert "handler bug" in caplog.text and "comes back after ack_wait" in caplog.text


def test_levels_of_one_rank_share_the_credit_of_their_backlogs():
    # A worker's levels: two task types at each of two priorities.
    p = Puller(_NoNetwork(), "WORK", ["h-a", "h-b", "l-a", "l-b"], 10, lambda level, msg: None, ranks=[0, 0, 1, 1])
    assert requests(p) == [("h-a", 5), ("h-b", 5)]  # both high types have a backlog: half each
    p = Puller(_NoNetwork(), "WORK", ["h-a", "h-b", "l-a", "l-b"], 12, lambda level, msg: None, ranks=[0, 0, 1, 1])
    p.levels[0].hot = False
    # The idle high type keeps a one-message long poll; the other gets the rest, the lows nothing.
    assert requests(p) == [("h-a", 1), ("h-b", 11)]


def test_levels_of_one_rank_never_ask_for_more_than_the_free_credit_together():
    p = Puller(_NoNetwork(), "WORK", [f"t{i}" for i in range(6)], 6, lambda level, msg: None, ranks=[0] * 6)
    p.held = 3  # three running: three free for six types with a backlog
    asked = requests(p)
    assert asked == [("t0", 1), ("t1", 1), ("t2", 1)] and p.free == 0
