"""What a compression costs: `submoe compress` in a fresh process per row, nothing else running,
with the CLI's default calibration on every domain; the report's calibration and merging times,
the whole run, and peak resident memory.

    make cost        # python benchmarks/method_cost.py [--out benchmarks/results]

Rows: the project's method as the quality benchmark measures it (output-lsq+refine@16k), with
each of its options (distillation, hybrid, correction vectors, the end-to-end choice of the fit)
and its closed-form part alone, on every stand-in at 50% of the experts; every published method,
as published and refined the same way, on the upcycled one. "Calibration" is what the method
needs (reading each layer, running the calibration windows through it, the statistics it reads);
"whole / calibration" is the run's time over it.
Writes method_cost.json and method_cost.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import MODELS, RESULTS, cost_run, machine, source_experts, write_results
from quality import MAIN_METHODS, REFINED

# the project's method as quality.py's ADDED rows run it (the quality preset; as a stock checkpoint,
# the stock preset), and its closed-form part alone
QUALITY = ("--output-tokens", "16384", "--refine-steps", "100")  # the quality preset's pipeline
CONFIGS = {"output-lsq+refine@16k": ("output-lsq", QUALITY),
           "output-lsq+refine+vanilla@16k": ("output-lsq", (*QUALITY, "--export", "vanilla")),
           "output-lsq@16k": ("output-lsq", ("--output-tokens", "16384")),
           # its four options, each on top of the quality preset
           "output-lsq+refine+distill@16k": ("output-lsq", (*QUALITY, "--distill-steps", "800")),
           "output-lsq+hybrid+refine@16k": ("output-lsq", (*QUALITY, "--hybrid")),
           "output-lsq+refine+correct@16k": ("output-lsq", (*QUALITY, "--correct")),
           "output-lsq+choose+refine@16k": ("output-lsq", (*QUALITY, "--choose-end-to-end"))}
AS_PUBLISHED = [*MAIN_METHODS, "mone", "man", "msan"]  # and the main table's baselines


def plan() -> list[tuple[str, Path, str, str, tuple[str, ...]]]:
    """(stand-in, its directory, configuration, method, more options) per row."""
    rows = [(name, path, label, method, extra) for name, path in MODELS.items() for label, (method, extra) in CONFIGS.items()]
    refined = [(f"{m}+refine@16k", m, QUALITY) for m in REFINED]
    return rows + [("upcycled", MODELS["upcycled"], label, m, extra)
                   for label, m, extra in [(m, m, ()) for m in AS_PUBLISHED] + refined]


def markdown(rows: list[dict]) -> str:
    lines = ["# Cost of `submoe compress` at 50% of the experts", "",
             "| stand-in | configuration | calibration s | merging s | whole run s | whole / calibration | "
             "peak RSS MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['config']} | {r['calibration_seconds']:.1f} | {r['merging_seconds']:.1f} | "
              f"{r['compress_seconds']:.1f} | {r['over_calibration']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    measured_on, rows = machine(), []
    with tempfile.TemporaryDirectory(prefix="submoe-cost-") as td:
        for name, path, label, method, extra in plan():
            n = source_experts(path) // 2
            r = cost_run(path, method, n, Path(td), extra)
            rows.append({"model": f"{name} {n * 2}->{n}", "config": label, **r,
                         "over_calibration": round(r["compress_seconds"] / r["calibration_seconds"], 2)})
            print(rows[-1], flush=True)
    write_results(args.out, "method_cost", {"rows": rows}, markdown(rows), measured_on)
    print(markdown(rows))


if __name__ == "__main__":
    main()
