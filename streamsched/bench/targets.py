"""The performance targets, judged on the results of one run.

Each target is judged only from figures of the same run, since the machine's speed drifts: a ratio needs
both of its sides in ``results``, and a target whose scenario did not run is left out.
"""

from __future__ import annotations

from typing import Any

#: End-to-end throughput as a share of the raw two-hop pipeline of the same run (the
#: reference one, whose stages take each message with ``next_msg()``; see bench.stage).
CEILING_RATIO = 0.8
#: End-to-end throughput as a multiple of the best peer of the same run.
PEER_RATIO = 2.0
#: submit -> started at 250 tasks/s, ms.
LATENCY_P50_MS, LATENCY_P99_MS = 2.0, 8.0
INGRESS_PER_S = 8000.0
#: A high task published right after a burst of low ones starts before this share of them finished.
DOOR_SHARE = 0.01
#: ``bench api``: ``GET /api/v1/tasks?status=failed&limit=50`` with 100,000 tasks in the system, p99.
API_LIST_P99_MS = 100.0
#: ``bench fairness``: the p99 wait of tenant B's trickle under tenant A's flood, with fairness keys.
FAIRNESS_P99_MS = 1000.0
BACKLOG_RSS_MB = 150.0
BACKLOG_BYTES_PER_TASK = 1024.0
#: "Flat while the backlog grows": no role grows by more than this share of its size over the
#: second half of the time the backlog takes to queue and route (a leak keeps growing with
#: the backlog; caches and the allocator's pools fill in the first seconds).
BACKLOG_GROWTH = 0.1


def judge(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(target, this run's figure, met)`` for every target this run has figures for."""
    rows: list[tuple[str, str, bool]] = []
    throughput = results.get("throughput")
    ceiling = results.get("ceiling")
    if throughput and ceiling:
        ratio = throughput["tasks_per_s"] / ceiling["pipeline_per_s"]
        rows.append((f"throughput >= {CEILING_RATIO} x raw two-hop", ceiling_ratios(throughput, ceiling), ratio >= CEILING_RATIO))
    best = best_peer(results.get("peers"))
    if throughput and best:
        ratio = throughput["tasks_per_s"] / best
        rows.append((f"throughput >= {PEER_RATIO:.0f} x best peer", f"{ratio:.2f} x", ratio >= PEER_RATIO))
    fixed = next((lat for lat in results.get("latency", []) if lat["rate_per_s"] == 250.0), None)
    if fixed:
        started = fixed["submit_to_started_ms"]
        rows.append(
            (
                f"latency at 250/s: p50 <= {LATENCY_P50_MS:.0f} ms, p99 <= {LATENCY_P99_MS:.0f} ms",
                f"{started['p50']:.2f} / {started['p99']:.2f} ms",
                started["p50"] <= LATENCY_P50_MS and started["p99"] <= LATENCY_P99_MS,
            )
        )
    priority = results.get("priority")
    if priority:
        p99 = priority["high_wait_to_start_ms"]["p99"]
        rows.append((f"priority: p99 <= {priority['target_ms']:.0f} ms", f"{p99:.2f} ms", p99 <= priority["target_ms"]))
        door = priority.get("door")
        if door:
            share = door["share_done_at_start"]
            name = f"priority at the door: a high after {door['lows']} lows starts before {DOOR_SHARE:.0%} of them finished"
            rows.append((name, f"{share:.2%} ({door['lows_done_at_start']})", share < DOOR_SHARE))
    ingress = results.get("ingress")
    if ingress:
        rate = ingress["master_drain_per_s"]
        rows.append((f"ingress >= {INGRESS_PER_S:.0f}/s", f"{rate:.0f}/s", rate >= INGRESS_PER_S))
    dag = results.get("dag")
    if dag and "workflows" in dag:
        judged = dag["workflows"]
        p99 = judged["edge_latency_ms"]["p99"]
        name = f"dag, {judged['size']}-task DAGs at {judged['rate_per_s']:.0f}/s: dependency -> dependant p99 <= {dag['edge_target_ms']:.0f} ms"
        rows.append((name, f"{p99:.2f} ms", p99 <= dag["edge_target_ms"]))
    api = results.get("api")
    if api:
        p99 = api["list_ms"]["status=failed&limit=50"]["p99"]
        name = f"api: GET /api/v1/tasks?status=failed&limit=50 with {api['tasks']} tasks, p99 <= {API_LIST_P99_MS:.0f} ms"
        rows.append((name, f"{p99:.2f} ms", p99 <= API_LIST_P99_MS))
        if "history_ms" in api:
            worst = max(ms["p99"] for ms in api["history_ms"].values())
            name = f"api: a task's events (old or new) with {api['history_tasks']} tasks' events in EVENTS, p99 <= {API_LIST_P99_MS:.0f} ms"
            rows.append((name, f"{worst:.2f} ms", worst <= API_LIST_P99_MS))
    fairness = results.get("fairness")
    if fairness:
        p99 = fairness["fair"]["b_wait_once_queued_ms"]["p99"]
        name = f"fairness: B's trickle under A's queued {fairness['flood']}-task flood, p99 wait <= {FAIRNESS_P99_MS:.0f} ms"
        rows.append((name, f"{p99:.1f} ms", p99 <= FAIRNESS_P99_MS))
    backlog = results.get("backlog")
    if backlog:
        peak_role, peak = max(_roles(backlog["peak_rss_mb"]).items(), key=lambda item: item[1])
        rows.append((f"backlog: every role < {BACKLOG_RSS_MB:.0f} MB", f"{peak:.0f} MB ({peak_role})", peak < BACKLOG_RSS_MB))
        growth_role, growth = _growth(backlog)
        rows.append(
            (
                f"backlog: RSS flat (<= {BACKLOG_GROWTH:.0%} over the second half)",
                f"{growth:+.0%} ({growth_role})",
                growth <= BACKLOG_GROWTH,
            )
        )
        stream, size = max(backlog["disk_bytes_per_task"].items(), key=lambda item: item[1])
        rows.append((f"backlog: < {BACKLOG_BYTES_PER_TASK:.0f} B per task per stream", f"{size:.0f} B ({stream})", size < BACKLOG_BYTES_PER_TASK))
    return rows


def ceiling_ratios(throughput: dict[str, Any], ceiling: dict[str, Any], name: str = "") -> str:
    """End to end / the reference two-hop, then / the lean one when it ran:
    "0.70 x{name} (lean: 0.35 x)"."""
    text = f"{throughput['tasks_per_s'] / ceiling['pipeline_per_s']:.2f} x{name}"
    if "lean_pipeline_per_s" in ceiling:
        text += f" (lean: {throughput['tasks_per_s'] / ceiling['lean_pipeline_per_s']:.2f} x)"
    return text


def best_peer(peers: dict[str, Any] | None) -> float | None:
    """tasks/s of the fastest peer that finished, if any ran."""
    if not peers or "peers" not in peers:
        return None
    return max((row["tasks_per_s"] for row in peers["peers"] if "error" not in row), default=None)


def _roles(rss: dict[str, float]) -> dict[str, float]:
    """Our processes only: nats-server is the engine, not a role."""
    return {name: mb for name, mb in rss.items() if name != "nats-server"}


def _growth(backlog: dict[str, Any]) -> tuple[str, float]:
    """The largest relative RSS growth of a role from half the time the backlog took to be
    queued and routed to its end (the worker starts only after)."""
    samples = [s for s in backlog["rss_samples"] if s["t"] <= backlog["routed_s"]]
    if len(samples) < 2:
        return "-", 0.0
    half = min(samples, key=lambda s: abs(s["t"] - backlog["routed_s"] / 2))
    last = samples[-1]
    growth = {name: (last["rss_mb"][name] - mb) / mb for name, mb in _roles(half["rss_mb"]).items() if mb > 0 and name in last["rss_mb"]}
    return max(growth.items(), key=lambda item: item[1]) if growth else ("-", 0.0)
