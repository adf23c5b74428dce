"""``streamsched bench``: benchmark scenarios, each on its own nats-server (file storage).

Scenarios: ``throughput``, ``latency``, ``priority``, ``ingress``, ``backlog``, ``ceiling``,
``dag`` (a random DAG and a split, :mod:`.dag`), ``fairness`` (a tenant's trickle under another's
flood, :mod:`.fairness`), ``api`` (listing tasks over REST with 100,000 in KV, :mod:`.api`), ``peers``
and ``all`` (ceiling first, then the others, so ratios compare figures of one run).
``throughput`` and ``latency`` measure the raw ceiling in the same run unless told not to.
``peers`` (optional: ``pip install -e '.[peers]'`` and redis-server from apt) runs Celery,
Dramatiq and taskiq on the same no-op workload, in three rounds with our ``throughput`` run
first in each, and reports the median of each (see :mod:`.rounds`); ``all``
runs it in place of ``throughput``, or, without the extra, ``throughput`` once and says why
the peers were skipped. Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import psutil

from . import api as api_mod
from . import ceiling as ceiling_mod
from . import dag as dag_mod
from . import fairness as fairness_mod
from . import peers as peers_mod
from . import rounds, scenarios, targets
from .harness import Roles

__all__ = ["SCENARIOS", "Roles", "machine", "report", "run", "save"]

SCENARIOS = ("throughput", "latency", "priority", "ingress", "backlog", "ceiling", "dag", "fairness", "api", "peers", "all")


def machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def run(scenario: str, *, quick: bool = False, with_ceiling: bool = True, roles: Roles | None = None) -> dict[str, Any]:
    """Run one scenario (or ``all``) and return its results."""
    scale = 10 if quick else 1
    results: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick}
    # ``peers`` runs our throughput too, in turns with the peers (see .rounds).
    wanted = ("ceiling", "peers", "latency", "priority", "ingress", "backlog", "dag", "fairness", "api") if scenario == "all" else (scenario,)
    if with_ceiling and scenario in ("throughput", "latency"):
        wanted = ("ceiling", *wanted)
    for name in wanted:
        if name == "ceiling":
            results["ceiling"] = await ceiling_mod.ceiling(100_000 // scale, 40_000 // scale)
        elif name == "throughput":
            results["throughput"] = await scenarios.throughput(50_000 // scale, roles)
        elif name == "latency":
            fixed = await scenarios.latency(250.0, 2500 // scale, roles)
            results["latency"] = [fixed]
            best = results.get("throughput", {}).get("tasks_per_s") or results.get("ceiling", {}).get("pipeline_per_s")
            if best:
                # Half of the measured maximum (ours when measured, else the raw ceiling's).
                rate = 0.5 * (results["throughput"]["tasks_per_s"] if "throughput" in results else best)
                results["latency"].append(await scenarios.latency(rate, int(rate * 10) // scale, roles))
        elif name == "priority":
            results["priority"] = await scenarios.priority(100_000 // scale, 20, 0.01, roles, door_lows=scenarios.DOOR_LOWS // scale)
        elif name == "ingress":
            results["ingress"] = await scenarios.ingress(200_000 // scale, roles)
        elif name == "backlog":
            results["backlog"] = await scenarios.backlog(1_000_000 // scale, roles)
        elif name == "dag":
            results["dag"] = await dag_mod.dag(10_000 // scale, 1000 // scale, roles)
        elif name == "api":
            results["api"] = await api_mod.api(api_mod.TASKS // scale, history_tasks=api_mod.HISTORY_TASKS // scale)
        elif name == "fairness":
            results["fairness"] = await fairness_mod.fairness(fairness_mod.FLOOD // scale, fairness_mod.TASK_S, roles)
        elif name == "peers":
            results.update(await _throughput_and_peers(scale, roles, 1 if quick else rounds.ROUNDS))
    return results


async def _throughput_and_peers(scale: int, roles: Roles | None, count: int) -> dict[str, Any]:
    """Our throughput and the peers in turns, ``count`` rounds, each figure the median of
    its rounds; without the peers extra, our throughput once and the reason."""
    if peers_mod.unavailable() is not None:
        return {"throughput": await scenarios.throughput(50_000 // scale, roles), "peers": await peers_mod.run(scale)}
    ours, theirs = [], []
    for _ in range(count):
        ours.append(await scenarios.throughput(50_000 // scale, roles))
        theirs.append(await peers_mod.run(scale))
    return {"throughput": rounds.median_run(ours), "peers": rounds.combine_peers(theirs)}


def _lean_line(ceiling: dict[str, Any]) -> list[str]:
    if "lean_pipeline_per_s" not in ceiling:  # results saved before the lean pipeline existed
        return []
    return [
        f"  two-hop, lean      {ceiling['lean_pipeline_per_s']:>10.0f} tasks/s   "
        f"CPU µs/task {_cpu(ceiling['lean_pipeline_cpu_us_per_task'])}   (stages skip next_msg(); for comparison)"
    ]


def save(results: dict[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def report(results: dict[str, Any]) -> str:
    """The human-readable tables, with ratios to the raw ceiling of the same run."""
    lines: list[str] = []
    ceiling = results.get("ceiling")
    if ceiling:
        lines += [
            "raw engine (nats-py, no streamsched), same run:",
            f"  publish            {ceiling['publish_per_s']:>10.0f} msgs/s",
            f"  pull + ack         {ceiling['consume_per_s']:>10.0f} msgs/s",
            f"  two-hop pipeline   {ceiling['pipeline_per_s']:>10.0f} tasks/s   "
            f"CPU µs/task {_cpu(ceiling['pipeline_cpu_us_per_task'])}   (stages take each message with next_msg(); the targets' reference)",
            *_lean_line(ceiling),
            "  nats-server msgs/task   in {:.1f}, out {:.1f}".format(*ceiling["pipeline_server_in_out_per_task"]),
        ]
    t = results.get("throughput")
    if t:
        ratio = "   = " + targets.ceiling_ratios(t, ceiling, " raw two-hop") if ceiling else ""
        lines += [
            f"throughput ({t['n']} no-op tasks, {t['roles']['workers']} worker x {t['roles']['concurrency']}"
            f"{_prefetch(t['roles'])}{_replicas(t['roles'])}):",
            f"  end to end         {t['tasks_per_s']:>10.0f} tasks/s{ratio}{rounds.spread(t)}",
            f"  projected to KV    {t['projected_per_s']:>10.0f} tasks/s",
            f"  submit             {t['submit_per_s']:>10.0f} tasks/s",
            f"  CPU µs/task        {t['cpu_us_per_task_total']:>10.0f} total: {_cpu(t['cpu_us_per_task'])}",
            "  nats-server msgs/task   in {:.1f}, out {:.1f}; stored: ".format(*t["server_in_out_per_task"])
            + ", ".join(f"{name} {count:.2f}" for name, count in t["stream_messages_per_task"].items()),
        ]
    for lat in results.get("latency", []):
        s, f = lat["submit_to_started_ms"], lat["submit_to_succeeded_ms"]
        lines += [
            f"latency at {lat['rate_per_s']:.0f} tasks/s ({lat['n']} tasks), ms:",
            f"  submit -> started    p50 {s['p50']:6.2f}  p95 {s['p95']:6.2f}  p99 {s['p99']:6.2f}  max {s['max']:7.2f}",
            f"  submit -> succeeded  p50 {f['p50']:6.2f}  p95 {f['p95']:6.2f}  p99 {f['p99']:6.2f}  max {f['max']:7.2f}",
        ]
    p = results.get("priority")
    if p:
        w = p["high_wait_to_start_ms"]
        lines += [
            f"priority ({p['backlog']} low tasks of {p['low_task_ms']:.0f} ms queued, 20 high one at a time, "
            f"{p['roles']['workers']} worker x {p['roles']['concurrency']}; trials began once the backlog was routed "
            f"and in the view, {p['settle_s']:.1f} s after it was queued), ms to start:",
            f"  p50 {w['p50']:.2f}  p95 {w['p95']:.2f}  p99 {w['p99']:.2f}  max {w['max']:.2f}   (target <= {p['target_ms']:.0f})",
            "  by hop (p50/p99): " + ", ".join(f"{hop} {v['p50']:.1f}/{v['p99']:.1f}" for hop, v in p["hops_ms"].items()),
            *_door_lines(p.get("door")),
        ]
    g = results.get("ingress")
    if g:
        lines += [
            f"ingress ({g['n']} raw submissions queued, then master, regional and projector started):",
            f"  master drained  {g['master_drain_per_s']:>10.0f} tasks/s   (target >= 8000)",
            f"  CPU µs/task     {_cpu(g['cpu_us_per_task'])}",
        ]
    b = results.get("backlog")
    if b:
        lines += [
            f"backlog ({b['n']} tasks queued with no workers, then drained):",
            f"  submitted in {b['submit_s']:.0f}s, all in WORK after {b['routed_s']:.0f}s, drained at {b['drain_per_s']:.0f} tasks/s",
            "  peak RSS MB        " + ", ".join(f"{k} {v:.0f}" for k, v in b["peak_rss_mb"].items()),
            *_rss_over_time(b),
            "  disk bytes/task    " + ", ".join(f"{k} {v:.0f}" for k, v in b["disk_bytes_per_task"].items()),
        ]
    d = results.get("dag")
    if d:
        lines += [
            f"dag ({d['n']} no-op tasks, {d['edges']} dependencies, submitted in random order):",
            f"  end to end         {d['tasks_per_s']:>10.0f} tasks/s",
            *([f"  CPU µs/task        {sum(cpu.values()):>10.0f} total: {_cpu(cpu)}"] if (cpu := d.get("cpu_us_per_task")) else []),
            *_edge_lines("at full speed", d),
            *(line for k in ("half_speed", "paced") if k in d for line in _edge_lines(f"{d[k]['n']} more at {d[k]['rate_per_s']:.0f} tasks/s", d[k])),
            *(_edge_lines(f"{w['n']} more at {w['rate_per_s']:.0f} tasks/s as {w['size']}-task DAGs", w) if (w := d.get("workflows")) else []),
        ]
        if "split" in d:
            sp = d["split"]
            lines.append(f"  split into {sp['chunks']} chunks, gathered in {sp['seconds']:.2f} s ({sp['chunks_per_s']:.0f} chunks/s)")
    lines += _fairness_lines(results.get("fairness"))
    lines += _api_lines(results.get("api"))
    lines += _peers_lines(results)
    judged = targets.judge(results)
    if judged:
        width = max(len(name) for name, _, _ in judged)
        lines.append(
            "targets, figures of this run"
            + (" (--quick: a tenth of the counts the targets are set for, so only a hint):" if results.get("quick") else ":")
        )
        lines += [f"  {name:<{width}}  {figure:<22} {'met' if met else 'NOT MET'}" for name, figure, met in judged]
    return "\n".join(lines)


def _api_lines(a: dict[str, Any] | None) -> list[str]:
    if not a:
        return []
    lines = [
        f"api ({a['tasks']} tasks in KV; streamsched api loaded its task list in {a['load_s']:.1f} s, RSS {a['api_rss_mb']:.0f} MB), "
        f"GET /api/v1/tasks, {a['requests']} requests each:"
    ]
    for query, ms in a["list_ms"].items():
        lines.append(f"  {query:<40} p50 {ms['p50']:6.2f}  p99 {ms['p99']:6.2f}  max {ms['max']:6.2f} ms")
    if "history_ms" in a:
        stream = a["events_in_stream"]
        lines.append(
            f"  GET /api/v1/tasks/{{id}}/events with {a['history_tasks']} tasks' events in EVENTS "
            f"({stream['messages']} messages, {stream['bytes'] / 2**20:.0f} MiB):"
        )
        for which, ms in a["history_ms"].items():
            lines.append(f"  {which:<40} p50 {ms['p50']:6.2f}  p99 {ms['p99']:6.2f}  max {ms['max']:6.2f} ms")
    return lines


def _fairness_lines(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    lines = [f"fairness (tenant A floods {f['flood']} low tasks of {f['task_ms']:.0f} ms, tenant B sends one a second; B's wait to start):"]
    for label, key in (("with fairness keys", "fair"), ("without (arrival order)", "plain")):
        run, w, q = f[key], f[key]["b_wait_to_start_ms"], f[key]["b_wait_once_queued_ms"]
        lines += [
            f"  {label:<24} p50 {w['p50']:8.1f}  p99 {w['p99']:8.1f}  max {w['max']:8.1f} ms"
            f"   ({run['samples']} of B's tasks; the flood was queued after {run['queued_s']:.1f} s, ran {run['flood_s']:.1f} s)",
            f"    once it was queued     p50 {q['p50']:8.1f}  p99 {q['p99']:8.1f}  max {q['max']:8.1f} ms   ({run['samples_once_queued']} tasks)",
        ]
    return lines


def _door_lines(door: dict[str, Any] | None) -> list[str]:
    """The trial at the door: a high task published right after a burst of lows (results saved before it have none)."""
    if not door:
        return []
    return [
        f"  at the door: a high task on tasks.submit.high right after {door['lows']} lows of {door['low_task_ms']:.0f} ms "
        f"on tasks.submit.low (published in {door['publish_s']:.1f} s) started {door['high_wait_to_start_ms']:.1f} ms after it was sent,",
        f"    when {door['lows_done_at_start']} lows had finished ({door['share_done_at_start']:.2%}; "
        f"{door['lows_done_while_it_waited']} while it waited)   (target < {targets.DOOR_SHARE:.0%})",
    ]


def _edge_lines(label: str, figures: dict[str, Any]) -> list[str]:
    e, r, q = figures["edge_latency_ms"], figures["release_ms"], figures["release_to_start_ms"]
    return [
        f"  {label}: dependency's success -> dependant's start   p50 {e['p50']:.2f}  p95 {e['p95']:.2f}  p99 {e['p99']:.2f}  max {e['max']:.2f} ms",
        f"    of which: until released p50 {r['p50']:.2f} p99 {r['p99']:.2f}, then to start p50 {q['p50']:.2f} p99 {q['p99']:.2f} ms;"
        f" largest burst: {figures['largest_burst']} tasks ready within {1000 * dag_mod.BURST_WINDOW_S:.0f} ms",
    ]


def _rss_over_time(backlog: dict[str, Any], points: int = 8) -> list[str]:
    """RSS of each process at a few moments spread over the run, so growth shows in the table."""
    samples = backlog["rss_samples"]
    if len(samples) < 2:
        return []
    picked = [samples[round(i * (len(samples) - 1) / (points - 1))] for i in range(points)]
    lines = ["  RSS MB at " + ", ".join(f"{s['t']:.0f}" for s in picked) + f" s (worker from {backlog['routed_s']:.0f} s):"]
    for name in samples[-1]["rss_mb"]:
        lines.append(f"    {name:<14} " + " ".join(f"{s['rss_mb'].get(name, 0.0):>5.0f}" for s in picked))
    return lines


def _peers_lines(results: dict[str, Any]) -> list[str]:
    peers = results.get("peers")
    if not peers:
        return []
    if "skipped" in peers:
        return [f"peers: skipped: {peers['skipped']}"]
    count = peers.get("rounds", 1)
    lines = [f"peers (same no-op workload, same run{f', median of {count} rounds in turns with ours' if count > 1 else ''}), tasks/s:"]
    for row in peers["peers"]:
        label = f"  {row['name']} ({row['config']})"
        if "error" in row:
            lines.append(f"{label:<42} failed: {row['error']}")
        else:
            lines.append(
                f"{label:<42} {row['tasks_per_s']:>6.0f}   {row['n']} tasks, "
                f"CPU µs/task {row['cpu_us_per_task_total']:.0f}: {_cpu(row['cpu_us_per_task'])}{rounds.spread(row)}"
                + (f"; failed in {len(row['failed_rounds'])} round(s): {row['failed_rounds'][-1]}" if "failed_rounds" in row else "")
            )
    best = targets.best_peer(peers)
    ours = results.get("throughput", {}).get("tasks_per_s")
    if ours:
        ratio = f"   = {ours / best:.1f}x best peer (target >= 2)" if best else "   (no peer finished)"
        lines.append(f"{'  streamsched':<42} {ours:>6.0f}{ratio}")
    return lines


def _cpu(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in values.items())


def _prefetch(roles: dict[str, Any]) -> str:
    """`` + N prefetched`` when the run chose a prefetch (older results have none)."""
    return "" if roles.get("prefetch") is None else f" + {roles['prefetch']} prefetched"


def _replicas(roles: dict[str, Any]) -> str:
    """``; 2 masters, ...`` for the roles run more than once (and the regions, then each with
    its workers and regional schedulers); results saved before replicas have none."""
    counts = {name: roles.get(key, 1) for key, name in (("masters", "masters"), ("regionals", "regional schedulers"), ("projectors", "projectors"))}
    more = [f"{count} {name}" for name, count in counts.items() if count > 1]
    regions = roles.get("regions", 1)
    if regions > 1:
        more.append(f"{regions} regions (workers and regional schedulers in each)")
    return "; " + ", ".join(more) if more else ""
