"""The bench report: what it says about peers, from results of the shape the scenarios return."""

import msgspec
import pytest

from streamsched import bench
from streamsched.bench import rounds, targets


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


def test_targets_are_judged_only_on_figures_of_the_run() -> None:
    results = {
        "ceiling": {"pipeline_per_s": 10_000.0},
        "throughput": {"tasks_per_s": 9_000.0},
        "latency": [{"rate_per_s": 250.0, "submit_to_started_ms": {"p50": 1.5, "p99": 9.0}}],
        "ingress": {"master_drain_per_s": 8_500.0},
    }
    judged = {name.split(":")[0].split(" >=")[0]: met for name, _, met in targets.judge(results)}
    # 0.9 x the ceiling is met; a p99 of 9 ms is not; no peers or priority ran, so neither is judged.
    assert judged == {"throughput": True, "latency at 250/s": False, "ingress": True}


def test_backlog_flatness_compares_the_second_half_of_the_growth() -> None:
    def sample(t: float, projector_mb: float) -> dict:
        return {"t": t, "rss_mb": {"projector0": projector_mb, "nats-server": 10.0 * t + 1}}

    leaking = {"routed_s": 100.0, "rss_samples": [sample(t, 50.0 + t) for t in range(0, 101, 10)]}
    role, growth = targets._growth(leaking)
    assert role == "projector0" and growth > targets.BACKLOG_GROWTH  # 100 -> 150 MB: it grows with the backlog
    flat = {"routed_s": 100.0, "rss_samples": [sample(t, min(100.0, 20.0 + 10 * t)) for t in range(0, 101, 10)]}
    assert targets._growth(flat) == ("projector0", 0.0)  # filled early, then flat; nats-server is not a role


def test_backlog_report_shows_rss_over_time_from_first_to_last_sample() -> None:
    samples = [{"t": float(t), "rss_mb": {"projector0": 10.0 + t}} for t in range(0, 100, 5)]
    lines = bench._rss_over_time({"rss_samples": samples, "routed_s": 50.0}, points=3)
    assert lines[0].startswith("  RSS MB at 0, 50, 95 s")
    assert lines[1].split() == ["projector0", "10", "60", "105"]


def test_throughput_is_judged_on_the_reference_two_hop_and_shown_against_the_lean_one_too() -> None:
    results = {"ceiling": {"pipeline_per_s": 10_000.0, "lean_pipeline_per_s": 20_000.0}, "throughput": {"tasks_per_s": 8_500.0}}
    [(name, figure, met)] = targets.judge(results)
    assert name.startswith("throughput >= 0.8 x raw two-hop")
    assert figure == "0.85 x (lean: 0.42 x)" and met


def test_rounds_keep_the_median_run_of_ours_and_of_each_peer_with_every_rounds_figure() -> None:
    ours = rounds.median_run([{"tasks_per_s": 9.0, "cpu": "slow"}, {"tasks_per_s": 12.0, "cpu": "fast"}, {"tasks_per_s": 10.0, "cpu": "mid"}])
    assert ours == {"tasks_per_s": 10.0, "cpu": "mid", "rounds": [9.0, 12.0, 10.0]}
    failed = {"name": "b", "config": "c", "n": 100, "error": "TimeoutError: x"}
    combined = rounds.combine_peers(
        [
            {"peers": [_peer("a", 1000.0), _peer("b", 3000.0)]},
            {"peers": [_peer("a", 1400.0), failed]},
            {"peers": [_peer("a", 1200.0), _peer("b", 2000.0)]},
        ]
    )
    a, b = combined["peers"]
    assert (a["tasks_per_s"], a["rounds"]) == (1200.0, [1000.0, 1400.0, 1200.0])
    # Of b's two finished rounds the lower middle one; the failed round is kept, not hidden.
    assert (b["tasks_per_s"], b["rounds"], b["failed_rounds"]) == (2000.0, [3000.0, 2000.0], ["TimeoutError: x"])
    assert combined["rounds"] == 3 and targets.best_peer(combined) == 2000.0
    lines = bench._peers_lines({"throughput": {"tasks_per_s": 6000.0}, "peers": combined})
    assert "median of 3 rounds" in lines[0]
    assert lines[1].endswith("(median of 3: 1,000–1,400)")
    assert "failed in 1 round(s): TimeoutError: x" in lines[2]


def test_a_peer_that_failed_every_round_is_reported_as_failed() -> None:
    failed = {"name": "c", "config": "c", "n": 100, "error": "RuntimeError: worker exited"}
    combined = rounds.combine_peers([{"peers": [failed]}, {"peers": [failed]}])
    assert combined["peers"] == [failed] and targets.best_peer(combined) is None


def test_a_random_dag_only_depends_on_earlier_tasks_and_edges_measure_from_the_last_dependency() -> None:
    from streamsched.bench import dag

    graph = dag.random_dag(500, seed=3)
    order = list(graph)
    assert all(len(deps) <= dag.MAX_DEPENDENCIES for deps in graph.values())
    assert all(order.index(d) < order.index(task) for task, deps in graph.items() for d in deps)
    assert sum(map(len, graph.values())) > 500  # most tasks have dependencies
    small = {"a": [], "b": [], "c": ["a", "b"], "d": ["a"]}
    submitted = {"a": 0.5, "b": 0.5, "c": 0.6, "d": 3.0}
    started = {"a": 1.0, "b": 1.0, "c": 2.5, "d": 3.02}
    succeeded = {"a": 1.1, "b": 2.49, "c": 2.6}
    ready = dag.ready_at(small, submitted, succeeded)
    # c: from b, the later dependency; d: from its own submission, after a had succeeded.
    assert dag.latencies_ms(ready, started) == [pytest.approx(10.0), pytest.approx(20.0)]


def test_small_dags_stay_apart_and_are_submitted_one_after_another_in_random_order() -> None:
    from streamsched.bench import dag

    graph = dag.small_dags(100, 10, seed=4)
    assert len(graph) == 100
    # Every dependency lies within its own ten-task DAG.
    assert all(d.split("_")[0] == task.split("_")[0] for task, deps in graph.items() for d in deps)
    order = [msgspec.json.decode(body)["id"] for body in dag._bodies(graph, seed=1, block=10)]
    assert sorted(order) == sorted(graph)
    # One DAG after another, each shuffled within itself.
    assert [task.split("_")[0] for task in order] == [f"w{k}" for k in range(10) for _ in range(10)]
    assert order != list(graph)


def test_the_largest_burst_counts_tasks_ready_within_the_window() -> None:
    from streamsched.bench import dag

    assert dag.largest_burst([0.0, 0.004, 0.009, 0.5, 0.503], 0.010) == 3
    assert dag.largest_burst([0.0, 0.02, 0.04], 0.010) == 1
    assert dag.largest_burst([], 0.010) == 0


def test_the_dag_report_and_its_target() -> None:
    results = {
        "dag": {
            "n": 100,
            "edges": 150,
            "tasks_per_s": 900.0,
            "edge_latency_ms": {"p50": 4.0, "p95": 9.0, "p99": 95.0, "max": 140.0},
            "release_ms": {"p50": 3.0, "p95": 5.0, "p99": 60.0, "max": 100.0},
            "release_to_start_ms": {"p50": 1.0, "p95": 4.0, "p99": 35.0, "max": 40.0},
            "largest_burst": 80,
            "paced": {
                "n": 20,
                "rate_per_s": 250.0,
                "largest_burst": 12,
                "edge_latency_ms": {"p50": 4.0, "p95": 9.0, "p99": 15.0, "max": 40.0},
                "release_ms": {"p50": 3.0, "p95": 5.0, "p99": 10.0, "max": 30.0},
                "release_to_start_ms": {"p50": 1.0, "p95": 4.0, "p99": 5.0, "max": 10.0},
            },
            "workflows": {
                "n": 20,
                "size": 10,
                "rate_per_s": 250.0,
                "largest_burst": 2,
                "edge_latency_ms": {"p50": 4.0, "p95": 9.0, "p99": 25.0, "max": 40.0},
                "release_ms": {"p50": 3.0, "p95": 5.0, "p99": 20.0, "max": 30.0},
                "release_to_start_ms": {"p50": 1.0, "p95": 4.0, "p99": 5.0, "max": 10.0},
            },
            "edge_target_ms": 20.0,
            "split": {"chunks": 10, "seconds": 0.5, "chunks_per_s": 20.0},
        }
    }
    text = bench.report(results)
    assert "dag (100 no-op tasks, 150 dependencies" in text
    assert "split into 10 chunks" in text
    assert "20 more at 250 tasks/s" in text
    assert "20 more at 250 tasks/s as 10-task DAGs" in text
    assert "largest burst: 80 tasks ready within 10 ms" in text
    # Judged on the small DAGs: 25 ms is over the target (the full-speed 95 ms and the
    # one-graph 15 ms are not what it judges).
    judged = [(name, met) for name, _, met in targets.judge(results)]
    assert judged == [("dag, 10-task DAGs at 250/s: dependency -> dependant p99 <= 20 ms", False)]


def _door(done: int, lows: int = 20_000) -> dict:
    return {
        "lows": lows,
        "low_task_ms": 100.0,
        "publish_s": 0.8,
        "high_wait_to_start_ms": 12.5,
        "lows_done_at_start": done,
        "lows_done_while_it_waited": 3,
        "share_done_at_start": done / lows,
    }


def test_the_door_target_wants_the_high_task_started_before_1_percent_of_the_lows_finished() -> None:
    priority = {"high_wait_to_start_ms": {"p99": 15.0}, "target_ms": 20.0}
    rows = {name: (figure, met) for name, figure, met in targets.judge({"priority": {**priority, "door": _door(120)}})}
    assert rows["priority at the door: a high after 20000 lows starts before 1% of them finished"] == ("0.60% (120)", True)
    rows = {name: (figure, met) for name, figure, met in targets.judge({"priority": {**priority, "door": _door(200)}})}
    assert rows["priority at the door: a high after 20000 lows starts before 1% of them finished"] == ("1.00% (200)", False)
    # Results saved before the trial existed are judged on what they have.
    assert [name for name, _, _ in targets.judge({"priority": priority})] == ["priority: p99 <= 20 ms"]


def test_the_priority_report_shows_the_trial_at_the_door() -> None:
    lines = bench._door_lines(_door(120))
    assert "right after 20000 lows of 100 ms" in lines[0] and "started 12.5 ms after it was sent" in lines[0]
    assert lines[1].split() == ["when", "120", "lows", "had", "finished", "(0.60%;", "3", "while", "it", "waited)", "(target", "<", "1%)"]
    assert bench._door_lines(None) == []


def test_the_throughput_line_names_the_replicas_and_regions_it_ran_and_tasks_spread_over_the_regions() -> None:
    assert bench._replicas({"workers": 1, "concurrency": 100}) == ""  # results saved before replicas, or one of each
    roles = bench.Roles(masters=2, projectors=3, regions=2)
    assert bench._replicas(vars(roles)) == "; 2 masters, 3 projectors, 2 regions (workers and regional schedulers in each)"
    assert roles.region_names == ("r1", "r2") and bench.Roles().region_names == ("default",)
    assert [roles.region_of(i) for i in range(4)] == ["r1", "r2", "r1", "r2"]
    assert bench.Roles().region_of(7) is None  # one region: the masters route as for any task
