"""Compression cost against model size: peak resident memory and wall time of `submoe compress`
on random Mixtral-layout checkpoints of growing depth (same layer, more layers), up to >= 8 GB.

    python benchmarks/scaling.py [--layers 6,22,46] [--keep]

Each compression runs in its own process; its peak RSS is what the report records (getrusage).
Writes benchmarks/results/scaling.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUILD = ROOT / "build" / "scaling"
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden=1024, intermediate=3584, experts=8)
CALIB = dict(samples=16, seq_len=128, output_tokens=512)


def compress(src: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "offline.cli", "compress", "--model", str(src), "--out", str(out),
           "--method", "average", "--num-experts", "4", "--samples", str(CALIB["samples"]),
           "--seq-len", str(CALIB["seq_len"]), "--output-tokens", str(CALIB["output_tokens"]),
           "--calib", *map(str, sorted((ROOT / "data" / "calib").glob("*.jsonl"))), "--no-progress", "--force"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - t0
    report = json.loads((out / "compression_report.json").read_text())
    return {"wall_seconds": round(wall, 1), "peak_rss_bytes": report["peak_rss_bytes"],
            "source_bytes": report["sizes"]["source_weight_bytes"], "output_bytes": report["sizes"]["weight_bytes"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gb = [r["source_bytes"] / 2**30 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(gb, [r["peak_rss_bytes"] / 2**30 for r in rows], "o-", label="peak RSS of submoe compress")
    a.plot(gb, [r["layer_bytes"] / 2**30 for r in rows], "s--", label="one decoder layer (bf16, on disk)")
    a.plot(gb, gb, ":", color="grey", label="the whole model")
    a.set_xlabel("source checkpoint (GiB)"), a.set_ylabel("GiB"), a.set_title("memory"), a.legend()
    b.plot(gb, [r["wall_seconds"] for r in rows], "o-")
    b.set_xlabel("source checkpoint (GiB)"), b.set_ylabel("seconds"), b.set_title("wall time (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,22,46", help="decoder layers of each model (about 0.19 GB each)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models in build/scaling")
    args = ap.parse_args()
    from offline.synthetic import sharded_random_mixtral
    rows = []
    for layers in map(int, args.layers.split(",")):
        src, out = BUILD / f"mixtral-{layers}l", BUILD / f"mixtral-{layers}l-4e"
        if not (src / "config.json").is_file():
            shutil.rmtree(src, ignore_errors=True)
            sharded_random_mixtral(src, ROOT / "models" / "tiny-mixtral-8e", layers=layers, **SHAPE)
        row = {"layers": layers, **compress(src, out)}
        row["layer_bytes"] = 3 * SHAPE["experts"] * SHAPE["hidden"] * SHAPE["intermediate"] * 2
        row["peak_rss_over_layer"] = round(row["peak_rss_bytes"] / row["layer_bytes"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out)
        if not args.keep:
            shutil.rmtree(src)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"shape": SHAPE, "calibration": CALIB, "method": "average", "num_experts": "8->4",
            "machine": "2 CPU cores, 24 GiB RAM (other jobs running alongside: wall times are indicative)"}
    (RESULTS / "scaling.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = ["| layers | source | output | peak RSS | peak RSS / layer | wall time |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['source_bytes'] / 2**30:.2f} GiB | {r['output_bytes'] / 2**30:.2f} GiB | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_rss_over_layer']} | {r['wall_seconds']:.0f} s |")
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")
    plot(rows, RESULTS / "scaling.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
