"""Interleaved rounds: every deployment up at once, measured in alternation.

A machine drifts (±20% on a shared CPU minutes apart), so deployments measured one after the
other compare the drift as much as the models. Here each round sends every concurrency level's
prompts to every deployment, in an order that rotates from round to round, and a comparison is
a ratio taken within each round: its median over the rounds, and its spread, say what holds.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

# Per-round figures kept for each deployment and concurrency (all from `records.summarize`).
FIGURES = {"output_tokens_per_s": lambda p: p["output_tokens_per_s"],
           "itl_p50_s": lambda p: p["itl_s"]["p50"], "ttft_p50_s": lambda p: p["ttft_s"]["p50"],
           "e2e_p50_s": lambda p: p["e2e_s"]["p50"]}
# A ratio "higher is better" for each figure: throughput a/b, latencies b/a (so decode speed is 1/ITL).
HIGHER_IS_BETTER = {"output_tokens_per_s": True, "itl_p50_s": False, "ttft_p50_s": False, "e2e_p50_s": False}


def rotation(n: int, round_: int) -> list[int]:
    """The order deployments are measured in during `round_`: each goes first in turn."""
    start = round_ % n
    return list(range(start, n)) + list(range(start))


def run_rounds(n: int, rounds: int, concurrency: Sequence[int], take: Callable[[int], list], requests_at,
               measure_phase: Callable[[int, list, int], dict]) -> list[list[dict]]:
    """Per deployment, one entry per (round, concurrency): its figures and its place in the order.
    All deployments get the same prompts within a round and concurrency level (`take`), fresh
    ones in every round (none is answered from an earlier round's prefix cache).
    `measure_phase(deployment, prompts, concurrency)` runs one closed-loop phase."""
    per_deployment: list[list[dict]] = [[] for _ in range(n)]
    for r in range(rounds):
        for c in concurrency:
            prompts = take(requests_at(c))
            for position, i in enumerate(rotation(n, r)):
                phase = measure_phase(i, prompts, c)
                per_deployment[i].append({"round": r, "concurrency": c, "position": position,
                                          "errors": phase["errors"],
                                          **{k: f(phase) for k, f in FIGURES.items()}})
    return per_deployment


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and the number of values above 1 (the rounds in which a ratio says 'faster')."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "above_1": sum(v > 1 for v in values), "rounds": len(values), "per_round": list(values)}


def round_ratios(a: list[dict], b: list[dict]) -> list[dict]:
    """Deployment a against b, per concurrency: each figure's ratio taken within every round
    (higher is better: a's throughput / b's; b's latency / a's), summarised by `spread`."""
    rows = []
    for c in sorted({e["concurrency"] for e in a}):
        pairs = [(x, y) for x in a for y in b if x["concurrency"] == y["concurrency"] == c and x["round"] == y["round"]]
        row = {"concurrency": c}
        for key, higher in HIGHER_IS_BETTER.items():
            ratios = [(x[key] / y[key] if higher else y[key] / x[key]) for x, y in pairs if x[key] and y[key]]
            row[key] = spread(ratios) if ratios else None
        rows.append(row)
    return rows
