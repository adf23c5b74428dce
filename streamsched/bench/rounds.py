"""Rounds: our throughput and the peers measured in turns, each figure the median of its rounds.

The ``peers`` scenario runs three rounds, each our ``throughput`` and then the peers, and
reports every side as its median round with the range of the rounds: the machine's speed
drifts by a third over minutes, and taking turns puts a slow or a fast minute on both
sides of the ratio, not on one.
"""

from __future__ import annotations

from typing import Any

#: Rounds of ``peers`` (and of ``all``, which runs it); ``--quick`` runs one.
ROUNDS = 3


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tasks/s (the lower middle one for an even count), with the
    tasks/s of every run, in the order they ran, under ``rounds``."""
    ordered = sorted(runs, key=lambda run: run["tasks_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [run["tasks_per_s"] for run in runs]}


def combine_peers(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``peers`` result from several rounds: each peer's median run. A round in which a
    peer failed leaves its error under ``failed_rounds``; a peer that failed every round
    keeps its last error as its row."""
    first = results[0]
    if "peers" not in first:  # skipped
        return first
    rows = []
    for index in range(len(first["peers"])):
        runs = [result["peers"][index] for result in results]
        finished = [run for run in runs if "error" not in run]
        if not finished:
            rows.append(runs[-1])
            continue
        row = median_run(finished)
        if len(finished) < len(runs):
            row["failed_rounds"] = [run["error"] for run in runs if "error" in run]
        rows.append(row)
    return {**first, "peers": rows, "rounds": len(results)}


def spread(row: dict[str, Any]) -> str:
    """``" (median of 3: 9,800–11,200)"`` for a figure measured in rounds, else ``""``."""
    runs = row.get("rounds")
    if not runs or len(runs) < 2:
        return ""
    return f" (median of {len(runs)}: {min(runs):,.0f}–{max(runs):,.0f})"
