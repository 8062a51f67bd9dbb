"""Duplicate slots: how often a token's top-k reaches one merged expert through two router experts.

    make duplicates      # python benchmarks/duplicates.py [--out benchmarks/results]

The remap export serves a merged expert once per top-k slot that reaches it: vLLM's fused kernel
takes duplicate ids and adds their weights, so the expert is computed twice for that token.
Folding the duplicates into one slot would save that share of the routed-expert FLOPs. This
measures the share (the compression report's `duplicate_slot_rate`, on the calibration sample
as served) for every merging method at 50% of the experts, per layer, on the three stand-ins of
the quality benchmark, calibrated once per model (seed 0, its calibration settings).

Writes duplicates.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from harness import CALIB, MODELS, RESULTS, ROOT, Calibrations, compressed, machine, source_experts, write_results
from quality import MAIN_METHODS

from offline.calibration.settings import Calibration

PRUNING = {"reap", "freq-prune"}  # keep experts unchanged and drop the rest: no two slots share one


def measure(name: str, model_dir: Path, tmp: Path) -> dict:
    cal, n = Calibrations(model_dir, tmp), source_experts(model_dir) // 2
    rows = {}
    for method in [m for m in MAIN_METHODS if m not in PRUNING]:
        report, _ = compressed(cal, tmp / "ckpt", method, n, 0, CALIB, Calibration.samples)
        per_layer = [l["duplicate_slot_rate"] for l in report["layers"]]
        rows[method] = {"mean": statistics.fmean(per_layer), "per_layer": per_layer}
        print(f"{name} {method}: {rows[method]['mean']:.4f} {per_layer}", flush=True)
    return {"model": str(model_dir.relative_to(ROOT)), "experts": f"{n * 2}->{n}", "methods": rows}


def markdown(result: dict) -> str:
    names = list(result["models"])
    methods = list(dict.fromkeys(m for r in result["models"].values() for m in r["methods"]))
    lines = ["# Duplicate top-k slots at 50% of the experts (remap export, calibration sample)", "",
             "Share of the served top-k slots whose merged expert another slot of the same token already reaches: "
             "routed-expert FLOPs that folding duplicates would save. Mean over MoE layers [min, max].", "",
             "| method | " + " | ".join(f"{n} ({result['models'][n]['experts']})" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for m in methods:
        cells = []
        for n in names:
            r = result["models"][n]["methods"][m]
            cells.append(f"{r['mean']:.3f} [{min(r['per_layer']):.3f}, {max(r['per_layer']):.3f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    measured_on = machine()
    with tempfile.TemporaryDirectory() as td:
        result = {"samples": Calibration.samples, "seq_len": Calibration.seq_len, "output_tokens": Calibration.output_tokens,
                  "models": {name: measure(name, path, Path(td)) for name, path in MODELS.items()}}
    write_results(args.out, "duplicates", result, markdown(result), measured_on)
    print(markdown(result))


if __name__ == "__main__":
    main()
