"""Two ideas for the project's method, measured on the upcycled stand-in (seed 0, 8->4), kept only
if they pay (neither did):

- per-layer budgets from measured sensitivity: each layer's held-out output error with output-lsq
  at 2-6 experts, a greedy split of the same total, and the KL of the served split against the
  uniform one;
- router recalibration: after the merge and refinement, Adam on the N router rows against the
  layer's routed output as served (the top-k choice follows the new rows; gradients reach them
  through the selected experts' weights), held-out error every 25 steps.

    make ideas      # python benchmarks/ideas.py [--out benchmarks/results]; about 5 minutes on 2 cores

Writes ideas.json and ideas.md.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from harness import CALIB, MODELS, RESULTS, ROOT, Calibrations, EvalSettings, Evaluator, compressed, machine, write_results

from offline.calibration.settings import Calibration
from offline.calibration.stats_file import StatsFile, stats_layers
from offline.compress import reduce_group
from offline.methods import make_method, reduce_layer
from offline.methods.output_error import output_error, relative_error, served_gate_weights
from offline.methods.output_lsq import split_stats
from offline.options import CompressOptions
from offline.source.architecture import SourceArchitecture
from offline.source.checkpoint import LazyCheckpoint

MODEL, N, COUNTS, ROUTER_LRS = MODELS["upcycled"], 4, range(2, 7), (1e-2, 1e-3, 2e-4)
TOKENS = 16384  # sampled tokens, as the project's method uses them


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
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    measured_on, method = machine(), make_method("output-lsq")
    with tempfile.TemporaryDirectory(prefix="submoe-ideas-") as td:
        cal = Calibrations(MODEL, Path(td), output_tokens=TOKENS)
        stats_dir, _ = cal.get(CALIB, Calibration.samples, 0)
        source = LazyCheckpoint(MODEL)
        budgets = [N] * len(SourceArchitecture.of(source.config).moe_layers())
        # the project's method as compress runs it: output-lsq, then refinement
        refined = CompressOptions(model=str(MODEL), out=Path(td) / "unused", method="output-lsq", num_experts=N,
                                  stats=str(stats_dir), refine_steps=100)
        sensitivity, router = {}, {}
        for layer in stats_layers(source, StatsFile(stats_dir)):
            if layer.stats is None:
                continue
            stats = replace(layer.stats, experts=layer.experts)
            fit, held = split_stats(stats)
            sensitivity[layer.index] = {c: output_error(held, reduce_layer(method, layer.experts, fit, c, 0))
                                        for c in COUNTS}
            merged = reduce_group([layer], method, budgets, refined)[0].result
            router[layer.index] = {str(lr): router_refit(stats, merged, layer.router, lr) for lr in ROUTER_LRS}
            print(layer.index, sensitivity[layer.index], router[layer.index], flush=True)
        total = N * len(sensitivity)
        splits = {"uniform": [N] * len(sensitivity), "greedy": greedy_split(sensitivity, total, 2, 6),
                  "greedy within ±1": greedy_split(sensitivity, total, N - 1, N + 1)}
        ev, kl = Evaluator(MODEL, EvalSettings()), {}
        for name, counts in splits.items():
            out = Path(td) / name.replace(" ", "_")
            compressed(cal, out, "output-lsq", counts, 0, CALIB, Calibration.samples, output_tokens=TOKENS)
            summed = sum(sensitivity[l][c] for l, c in zip(sorted(sensitivity), counts))
            kl[name] = {"counts": counts, "summed_layer_error": summed, "kl": ev.score(out)["kl"]}
    result = {"model": str(MODEL.relative_to(ROOT)), "sensitivity": sensitivity, "splits": kl, "router_refit": router}
    lines = ["# Two ideas, measured (upcycled stand-in, seed 0, 8->4)", "",
             "| split of 16 experts | counts | summed held-out layer error | KL |", "|---|---|---:|---:|"]
    lines += [f"| {n} | {r['counts']} | {r['summed_layer_error']:.3f} | {r['kl']:.4f} |" for n, r in kl.items()]
    lines += ["", "| layer | router refit: held-out error before, then every 25 steps, per step size |", "|---|---|"]
    lines += [f"| {l} | " + "; ".join(f"{lr}: " + " ".join(f"{e:.4f}" for e in h) for lr, h in runs.items()) + " |"
              for l, runs in router.items()]
    write_results(args.out, "ideas", result, "\n".join(lines) + "\n", measured_on)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
