"""Two ideas for the project's method, measured on the upcycled stand-in (seed 0, 8->4), kept only
if they pay (neither did):

- per-layer budgets from measured sensitivity: each layer's held-out output error with output-lsq
  at 2-6 experts, a greedy split of the same total, and the KL of the served split against the
  uniform one;
- router recalibration: after the merge and refinement, Adam on the N router rows against the
  layer's routed output as served (the top-k choice follows the new rows; gradients reach them
  through the selected experts' weights), held-out error every 25 steps.

    python benchmarks/ideas.py [--out benchmarks/results]     # about 5 minutes on 2 cores

Writes ideas.json and ideas.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import CALIB, Evaluator, Settings
from offline.calibrate import calibrate
from offline.calibration.settings import CalibrateOptions
from offline.calibration.stats_file import StatsFile, stats_layers
from offline.compress import compress
from offline.methods import make_method, reduce_layer
from offline.methods.output_error import output_error, relative_error, served_gate_weights, served_weights
from offline.methods.output_lsq import split_stats
from offline.methods.refine import Refinement, refine
from offline.options import CompressOptions
from offline.source.checkpoint import LazyCheckpoint

MODEL, N, COUNTS, ROUTER_LRS = ROOT / "models" / "tiny-mixtral-8e", 4, range(2, 7), (1e-2, 1e-3, 2e-4)


def greedy_split(errors: dict[int, dict[int, float]], total: int, lo: int, hi: int) -> list[int]:
    """Counts per layer within [lo, hi] summing to `total`, each added expert where it lowers the
    summed layer error most."""
    counts = {l: lo for l in errors}
    while sum(counts.values()) < total:
        gain = {l: errors[l][c] - errors[l][c + 1] for l, c in counts.items() if c + 1 <= hi}
        counts[max(gain, key=gain.get)] += 1
    return [counts[l] for l in sorted(counts)]


def router_refit(stats, result, router: torch.Tensor, lr: float, steps: int = 100) -> list[float]:
    held = torch.arange(len(stats.tokens)) % 5 == 0
    fit, x, target = torch.nonzero(~held).flatten(), stats.tokens.float(), stats.moe_output.float()
    rows_error = lambda rows, r: relative_error(  # noqa: E731
        x[rows], served_gate_weights(stats.routing, x[rows] @ r.T, result), result.experts, target[rows])
    r = router.clone().requires_grad_(True)
    opt = torch.optim.Adam([r], lr=lr * router.pow(2).mean().sqrt().item())
    gen, history = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        history.append(rows_error(held, r).item())
    for step in range(1, steps + 1):
        rows = fit[torch.randint(len(fit), (1024,), generator=gen)]
        opt.zero_grad()
        rows_error(rows, r).pow(2).backward()
        opt.step()
        if step % 25 == 0:
            with torch.no_grad():
                history.append(rows_error(held, r).item())
    return history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    method = make_method("output-lsq")
    with tempfile.TemporaryDirectory(prefix="submoe-ideas-") as td:
        stats_dir = Path(td) / "stats"
        calibrate(CalibrateOptions(model=str(MODEL), out=stats_dir, calib=CALIB, output_tokens=16384, progress=False))
        sensitivity, router = {}, {}
        for layer in stats_layers(LazyCheckpoint(MODEL), StatsFile(stats_dir)):
            if layer.stats is None:
                continue
            stats = replace(layer.stats, experts=layer.experts)
            fit, held = split_stats(stats)
            sensitivity[layer.index] = {c: output_error(held, reduce_layer(method, layer.experts, fit, c, 0))
                                        for c in COUNTS}
            merged = reduce_layer(method, layer.experts, stats, N, 0)
            experts, _ = refine(merged.experts, served_weights(stats, merged), stats, Refinement(steps=100))
            merged = replace(merged, experts=experts)
            router[layer.index] = {str(lr): router_refit(stats, merged, layer.router, lr) for lr in ROUTER_LRS}
            print(layer.index, sensitivity[layer.index], router[layer.index], flush=True)
        total = N * len(sensitivity)
        splits = {"uniform": [N] * len(sensitivity), "greedy": greedy_split(sensitivity, total, 2, 6),
                  "greedy within ±1": greedy_split(sensitivity, total, N - 1, N + 1)}
        ev, kl = Evaluator(MODEL, Settings(models={}, seeds=[0])), {}
        for name, counts in splits.items():
            out = Path(td) / name.replace(" ", "_")
            compress(CompressOptions(model=str(MODEL), out=out, method="output-lsq", num_experts=counts,
                                     stats=str(stats_dir), progress=False))
            summed = sum(sensitivity[l][c] for l, c in zip(sorted(sensitivity), counts))
            kl[name] = {"counts": counts, "summed_layer_error": summed, "kl": ev.score(out)["kl"]}
    result = {"model": str(MODEL.relative_to(ROOT)), "sensitivity": sensitivity, "splits": kl, "router_refit": router}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ideas.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| split of 16 experts | counts | summed held-out layer error | KL |", "|---|---|---:|---:|"]
    lines += [f"| {n} | {r['counts']} | {r['summed_layer_error']:.3f} | {r['kl']:.4f} |" for n, r in kl.items()]
    lines += ["", "| layer | router refit: held-out error before, then every 25 steps, per step size |", "|---|---|"]
    lines += [f"| {l} | " + "; ".join(f"{lr}: " + " ".join(f"{e:.4f}" for e in h) for lr, h in runs.items()) + " |"
              for l, runs in router.items()]
    (args.out / "ideas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
