"""Ideas for the project's method, measured at seed 0, 8->4, kept only if they pay (none did):

- per-layer budgets from measured sensitivity: each layer's held-out output error with output-lsq
  at 2-6 experts, a greedy split of the same total, and the KL of the served split against the
  uniform one;
- router recalibration: after the merge and refinement, Adam on the N router rows against the
  layer's routed output as served (the top-k choice follows the new rows; gradients reach them
  through the selected experts' weights), held-out error every 25 steps;
- layer by layer, ours refined against MergeMoE refined (upcycled): every mixture of the two
  checkpoints' layers, its summed layer error and its KL, to see whether the layer-wise objective
  ranks merges as the served model does;
- W_D fitted also to the cluster's function on every sampled token (MergeMoE's target, the
  members' frequency-weighted output), with MergeMoE's grouping as a fourth candidate, on the
  upcycled and the from-scratch stand-ins.

    make ideas      # python benchmarks/ideas.py [--out benchmarks/results]; about 15 minutes on 2 cores

Writes ideas.json and ideas.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from harness import CALIB, MODELS, RESULTS, ROOT, Calibrations, EvalSettings, Evaluator, compressed, machine, write_results
from safetensors.torch import load_file, save_file

from offline.calibration.settings import Calibration
from offline.calibration.stats_file import StatsFile, stats_layers
from offline.compress import reduce_group
from offline.methods import METHODS, make_method, reduce_layer
from offline.methods.output_error import output_error, relative_error, served_gate_weights
from offline.methods.output_lsq import OutputLSQ, split_stats, weight_centre_grouping
from offline.options import CompressOptions
from offline.source.architecture import SourceArchitecture
from offline.source.checkpoint import LazyCheckpoint

MODEL, N, COUNTS, ROUTER_LRS = MODELS["upcycled"], 4, range(2, 7), (1e-2, 1e-3, 2e-4)
TOKENS = 16384  # sampled tokens, as the project's method uses them
FUNCTION_WEIGHTS = (1.0, 3.0)  # the function rows' total weight against the routed rows'


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


class FunctionFitLSQ(OutputLSQ):
    """output-lsq with MergeMoE's grouping as a fourth candidate at every `function_weight`, 0
    included (the candidate alone); above 0 it is output-lsq's own `function_weight`: beside the
    routed rows, W_D fits one row per sampled token whose target is the members' frequency-weighted
    output, weighing `function_weight` times the routed rows in all."""

    name = "output-lsq+function-fit"

    def candidates(self, stats, num_out, seed, experts):
        own = super().candidates(stats, num_out, seed, experts)
        return own if self.function_weight else own | weight_centre_grouping(stats, num_out, seed, experts)


def layer_of(key: str) -> int | None:
    m = re.match(r"(?:model|submoe)\.layers\.(\d+)\.", key)  # decoder weights and the format's per-layer tensors
    return int(m.group(1)) if m else None


def mixture(a: Path, b: Path, from_b: set[int], out: Path) -> None:
    """Checkpoint `a` with the decoder layers `from_b` (weights and remap tables) taken from `b`:
    both compress the same source, so only the MoE blocks differ."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(a, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for src in (a, b):
        for f in src.glob("*.safetensors"):
            tensors |= {k: v for k, v in load_file(f).items() if (layer_of(k) in from_b) == (src == b)}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config, other = (json.loads((d / "config.json").read_text()) for d in (out, b))
    for i in from_b:
        config["submoe"]["layers"][i] = other["submoe"]["layers"][i]
    (out / "config.json").write_text(json.dumps(config, indent=2))


def layer_errors(ckpt: Path) -> list[float]:
    return [l["moe_output_relative_error"] for l in json.loads((ckpt / "compression_report.json").read_text())["layers"]]


def layer_swaps(cal: Calibrations, ev: Evaluator, tmp: Path) -> list[dict]:
    """Every mixture of ours refined and MergeMoE refined, layer by layer."""
    ckpt = {m: tmp / f"swap-{m}" for m in ("output-lsq", "mergemoe")}
    for m, out in ckpt.items():
        compressed(cal, out, m, N, 0, CALIB, Calibration.samples, output_tokens=TOKENS, refine_steps=100)
    errors = {m: layer_errors(out) for m, out in ckpt.items()}
    rows = []
    for pick in itertools.product((0, 1), repeat=len(errors["mergemoe"])):
        from_b = {i for i, p in enumerate(pick) if p}
        mixture(ckpt["output-lsq"], ckpt["mergemoe"], from_b, tmp / "mixture")
        rows.append({"mergemoe_layers": sorted(from_b), "kl": ev.score(tmp / "mixture")["kl"],
                     "summed_layer_error": sum(errors["mergemoe" if p else "output-lsq"][i] for i, p in enumerate(pick))})
    return rows


def function_fit(tmp: Path) -> dict[str, dict[str, float]]:
    """KL of ours refined, and of FunctionFitLSQ refined at each weight, on the two 8-expert stand-ins."""
    METHODS[FunctionFitLSQ.name] = FunctionFitLSQ  # a configuration of this benchmark, not a shipped method
    out = {}
    for model in ("upcycled", "from-scratch"):
        cal, ev = Calibrations(MODELS[model], tmp / model, output_tokens=TOKENS), Evaluator(MODELS[model], EvalSettings())
        out[model] = {}
        for weight in (None, 0.0, *FUNCTION_WEIGHTS):
            method, options = ("output-lsq", {}) if weight is None else (FunctionFitLSQ.name, {"function_weight": weight})
            ckpt = tmp / f"fit-{model}-{weight}"
            compressed(cal, ckpt, method, N, 0, CALIB, Calibration.samples, options, output_tokens=TOKENS,
                       refine_steps=100)
            out[model]["ours" if weight is None else f"function weight {weight:g}"] = ev.score(ckpt)["kl"]
            print(model, weight, out[model], flush=True)
    return out


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
        swaps, fits = layer_swaps(cal, ev, Path(td)), function_fit(Path(td))
    result = {"model": str(MODEL.relative_to(ROOT)), "sensitivity": sensitivity, "splits": kl, "router_refit": router,
              "layer_swaps": swaps, "function_fit": fits}
    lines = ["# Ideas, measured (upcycled stand-in unless named, seed 0, 8->4)", "",
             "| split of 16 experts | counts | summed held-out layer error | KL |", "|---|---|---:|---:|"]
    lines += [f"| {n} | {r['counts']} | {r['summed_layer_error']:.3f} | {r['kl']:.4f} |" for n, r in kl.items()]
    lines += ["", "| layer | router refit: held-out error before, then every 25 steps, per step size |", "|---|---|"]
    lines += [f"| {l} | " + "; ".join(f"{lr}: " + " ".join(f"{e:.4f}" for e in h) for lr, h in runs.items()) + " |"
              for l, runs in router.items()]
    lines += ["", "| layers from MergeMoE refined, the rest ours refined | summed layer error | KL |", "|---|---:|---:|"]
    lines += [f"| {r['mergemoe_layers'] or 'none'} | {r['summed_layer_error']:.4f} | {r['kl']:.4f} |" for r in swaps]
    configs = list(next(iter(fits.values())))
    lines += ["", "| KL, refined | " + " | ".join(configs) + " |", "|---|" + "---:|" * len(configs)]
    lines += [f"| {m} | " + " | ".join(f"{v[c]:.4f}" for c in configs) + " |" for m, v in fits.items()]
    write_results(args.out, "ideas", result, "\n".join(lines) + "\n", measured_on)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
