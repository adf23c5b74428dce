"""The bench report: what it says about peers, from results of the shape the scenarios return."""

from streamsched import bench


def _peer(name: str, per_s: float) -> dict:
    return {"name": name, "config": "c", "n": 100, "tasks_per_s": per_s, "cpu_us_per_task": {"worker": 1.0}, "cpu_us_per_task_total": 1.0}


def test_peers_block_gives_the_ratio_to_the_best_peer_that_finished() -> None:
    results = {
        "throughput": {"tasks_per_s": 6000.0},
        "peers": {"peers": [_peer("a", 1000.0), _peer("b", 3000.0), {"name": "c", "config": "c", "n": 100, "error": "TimeoutError: x"}]},
    }
    lines = bench._peers_lines(results)
    assert lines[0].startswith("peers (")
    assert any("failed: TimeoutError" in line for line in lines)
    assert lines[-1].split() == ["streamsched", "6000", "=", "2.0x", "best", "peer", "(target", ">=", "2)"]


def test_a_skipped_peers_scenario_says_why_and_how_to_install() -> None:
    lines = bench._peers_lines({"peers": {"scenario": "peers", "skipped": "celery not found; install with: pip install -e '.[peers]'"}})
    assert lines == ["peers: skipped: celery not found; install with: pip install -e '.[peers]'"]
