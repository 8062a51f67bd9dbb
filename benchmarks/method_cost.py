"""What the project's method costs against one calibration pass: `submoe compress` in a fresh
process on each stand-in at 50% of the experts, the report's calibration and merging times, and
peak resident memory.

    python benchmarks/method_cost.py [--out benchmarks/results]

"One calibration pass" is the calibration the method needs (reading each layer, running the
calibration windows through it, the statistics it reads); the ratio is the whole run's time over it.
Writes method_cost.json and method_cost.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from quality import ROOT, Settings, cost_run

MODELS = {"upcycled 8->4": (ROOT / "models" / "tiny-mixtral-8e", 4),
          "from-scratch 8->4": (ROOT / "models" / "tiny-mixtral-8e-scratch", 4),
          "fine-grained 64->32": (ROOT / "models" / "tiny-qwen2-moe-64e", 32)}
# The project's method as the quality benchmark measures it (quality.py: output-lsq+refine@16k), and
# its closed-form part alone.
CONFIGS = {"output-lsq+refine@16k": ("output-lsq", ("--output-tokens", "16384", "--refine-steps", "100")),
           "output-lsq@16k": ("output-lsq", ("--output-tokens", "16384"))}


def measure(model: Path, n: int, method: str, extra: tuple[str, ...], tmp: Path) -> dict:
    r = cost_run(model, method, n, Settings(models={}, seeds=[0]), tmp, extra)  # the CLI's default calibration
    return {"wall_seconds": round(r["wall_seconds"], 1), "compress_seconds": r["compress_seconds"],
            "calibration_seconds": r["calibration_seconds"], "merging_seconds": r["merging_seconds"],
            "over_calibration": round(r["compress_seconds"] / r["calibration_seconds"], 2),
            "peak_rss_bytes": r["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="submoe-cost-") as td:
        for name, (model, n) in MODELS.items():
            for label, (method, extra) in CONFIGS.items():
                rows.append({"model": name, "config": label, **measure(model, n, method, extra, Path(td))})
                print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "method_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| stand-in | configuration | calibration s | merging s | whole run s | whole / calibration | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['config']} | {r['calibration_seconds']:.1f} | {r['merging_seconds']:.1f} | "
              f"{r['compress_seconds']:.1f} | {r['over_calibration']:.2f} | {r['peak_rss_bytes'] / 2**20:.0f} |"
              for r in rows]
    (args.out / "method_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
