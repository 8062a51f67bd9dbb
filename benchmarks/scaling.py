"""Compression cost against model size: peak resident memory and wall time of `submoe compress`
on random Mixtral-layout checkpoints of growing depth (same layer, more layers), up to >= 8 GB,
and what spilling the calibration activations to disk saves.

    python benchmarks/scaling.py [--layers 6,22,46] [--keep]

Each compression runs in its own process, as a user runs it; its report gives the peak RSS
(getrusage) and the RSS before any weight was read (libraries, tokenizer, calibration tokens:
the floor no model adds to). What a layer costs is the difference, in units of one decoder
layer's experts as stored (bf16). Writes benchmarks/results/scaling.{json,md,png}.
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
CALIB = dict(samples=64, seq_len=256, output_tokens=2048)  # 16k calibration tokens: 64 MiB per activation copy
SPILL_SAMPLES = 256  # the activation comparison: 64k tokens, 256 MiB per activation copy
SPILL_VARIANTS = {"in RAM": (), "spilled (--activation-memory 0)": ("--activation-memory", "0"),
                  "spilled, --calib-batch 4": ("--activation-memory", "0", "--calib-batch", "4")}
GiB = 2**30


def compress(src: Path, out: Path, samples: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "submoe", "compress", "--model", str(src), "--out", str(out),
           "--method", "submoe", "--num-experts", "4", "--samples", str(samples),
           "--seq-len", str(CALIB["seq_len"]), "--output-tokens", str(CALIB["output_tokens"]),
           "--calib", *map(str, sorted((ROOT / "data" / "calib").glob("*.jsonl"))), "--no-progress", "--force", *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.time() - t0
    report = json.loads((out / "compression_report.json").read_text())
    shutil.rmtree(out)
    layer = 3 * SHAPE["experts"] * SHAPE["hidden"] * SHAPE["intermediate"] * 2
    above = report["peak_rss_bytes"] - report["rss_before_weights_bytes"]
    activation_copy = samples * CALIB["seq_len"] * SHAPE["hidden"] * 4
    return {"wall_seconds": round(wall, 1), "peak_rss_bytes": report["peak_rss_bytes"],
            "rss_before_weights_bytes": report["rss_before_weights_bytes"],
            "source_bytes": report["sizes"]["source_weight_bytes"], "output_bytes": report["sizes"]["weight_bytes"],
            "layer_bytes": layer, "activation_copy_bytes": activation_copy, "samples": samples, "extra": list(extra),
            "peak_above_floor_in_layers": round(above / layer, 2)}


def ensure_source(layers: int) -> Path:
    from offline.synthetic import sharded_random_mixtral
    src = BUILD / f"mixtral-{layers}l"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        sharded_random_mixtral(src, ROOT / "models" / "tiny-mixtral-8e", layers=layers, **SHAPE)
    return src


def plot(rows: list[dict], spill: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gb = [r["source_bytes"] / GiB for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    a.plot(gb, [r["peak_rss_bytes"] / GiB for r in rows], "o-", label="peak RSS of submoe compress")
    a.plot(gb, [r["rss_before_weights_bytes"] / GiB for r in rows], "v:", label="RSS before any weight is read")
    a.plot(gb, [(r["rss_before_weights_bytes"] + 2 * r["layer_bytes"]) / GiB for r in rows], "s--",
           label="that + two decoder layers (bf16)")
    a.plot(gb, gb, ":", color="grey", label="the whole model")
    a.set_xlabel("source checkpoint (GiB)"), a.set_ylabel("GiB"), a.set_title("memory against model size")
    a.legend(fontsize=8)
    b.plot(gb, [r["wall_seconds"] for r in rows], "o-")
    b.set_xlabel("source checkpoint (GiB)"), b.set_ylabel("seconds"), b.set_title("wall time (2 CPU cores)")
    labels = ["in RAM", "spilled", "spilled,\nbatch 4"]
    c.bar(labels, [r["peak_rss_bytes"] / GiB for r in spill], label="peak RSS")
    c.bar(labels, [r["rss_before_weights_bytes"] / GiB for r in spill], label="before any weight")
    c.set_ylabel("GiB"), c.legend(fontsize=8, loc="lower right")
    c.set_title(f"{spill[0]['samples'] * CALIB['seq_len'] // 1024}k calibration tokens "
                f"({spill[0]['activation_copy_bytes'] / 2**20:.0f} MiB per copy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict], spill: list[dict]) -> str:
    lines = ["| layers | source | output | before weights | peak RSS | peak - before, in bf16 layers | wall time |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['source_bytes'] / GiB:.2f} GiB | {r['output_bytes'] / GiB:.2f} GiB | "
                     f"{r['rss_before_weights_bytes'] / GiB:.2f} GiB | {r['peak_rss_bytes'] / GiB:.2f} GiB | "
                     f"{r['peak_above_floor_in_layers']} | {r['wall_seconds']:.0f} s |")
    lines += ["", f"Calibration activations ({spill[0]['samples']} x {CALIB['seq_len']} tokens, "
              f"{spill[0]['activation_copy_bytes'] / 2**20:.0f} MiB per copy), {spill[0]['layers']} layers:", "",
              "| activations | peak RSS | peak - before, in bf16 layers | wall time |", "|---|---:|---:|---:|"]
    for name, r in zip(SPILL_VARIANTS, spill):
        lines.append(f"| {name} | {r['peak_rss_bytes'] / GiB:.2f} GiB | {r['peak_above_floor_in_layers']} | "
                     f"{r['wall_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,22,46", help="decoder layers of each model (about 0.19 GB each)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models in build/scaling")
    args = ap.parse_args()
    sizes = [int(n) for n in args.layers.split(",")]
    rows, spill = [], []
    for layers in sizes:
        src = ensure_source(layers)
        rows.append({"layers": layers, **compress(src, BUILD / "out", CALIB["samples"])})
        print(json.dumps(rows[-1]), flush=True)
        if layers == sizes[0]:  # the spill comparison on the smallest model
            for extra in SPILL_VARIANTS.values():
                spill.append({"layers": layers, **compress(src, BUILD / "out", SPILL_SAMPLES, *extra)})
                print(json.dumps(spill[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(src)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"shape": SHAPE, "calibration": CALIB, "method": "submoe (full rank)", "num_experts": "8->4",
            "machine": "2 CPU cores, 24 GiB RAM"}
    (RESULTS / "scaling.json").write_text(json.dumps({**meta, "rows": rows, "spill": spill}, indent=2) + "\n")
    (RESULTS / "scaling.md").write_text(markdown(rows, spill))
    plot(rows, spill, RESULTS / "scaling.png")
    print(markdown(rows, spill))


if __name__ == "__main__":
    main()
