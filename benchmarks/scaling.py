"""Compression cost against model size: peak resident memory and wall time of `submoe compress`
on random Mixtral-layout checkpoints of growing depth (same layer, more layers), up to >= 8 GB,
what spilling the calibration activations to disk saves, and the cost per method at real
fine-grained layer shapes (a few layers of each: Qwen3-30B-A3B's, ...) with the whole-model
extrapolation.

    python benchmarks/scaling.py [--layers 6,22,46] [--shapes Qwen3-30B-A3B] [--methods submoe,reap] [--keep]

Each compression runs in its own process, as a user runs it; its report gives the peak RSS
(getrusage) and the RSS before any weight was read (libraries, tokenizer, calibration tokens:
the floor no model adds to). What a layer costs is the difference, in units of one decoder
layer's experts as stored (bf16). Writes benchmarks/results/scaling.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, ROOT, machine

from offline.calibration.settings import Calibration

BUILD = ROOT / "build" / "scaling"
SHAPE = dict(hidden=1024, intermediate=3584, experts=8)
# 16k calibration tokens: 64 MiB per activation copy
CALIB = dict(samples=64, seq_len=Calibration.seq_len, output_tokens=Calibration.output_tokens)
SPILL_SAMPLES = 256  # the activation comparison: 64k tokens, 256 MiB per activation copy
SPILL_VARIANTS = {"in RAM": (), "spilled (--activation-memory 0)": ("--activation-memory", "0"),
                  "spilled, --calib-batch 4": ("--activation-memory", "0", "--calib-batch", "4")}
GiB = 2**30


MIXTRAL_LAYER = 3 * SHAPE["experts"] * SHAPE["hidden"] * SHAPE["intermediate"] * 2  # bytes of one layer's bf16 experts


def run_sampling_anon(cmd: list[str], every: float = 0.2) -> int:
    """Run `cmd`; its peak anonymous resident memory (RssAnon, sampled). Peak RSS counts the pages
    of memory-mapped source files too, which the kernel drops under pressure: a source layer larger
    than memory shows as about all of memory in RSS, while what the process itself must hold is
    its anonymous memory."""
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024)
        except (OSError, AttributeError):  # exiting
            pass
        time.sleep(every)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return peak


def compress(src: Path, out: Path, samples: int, *extra: str, method: str = "submoe", num_experts: int = 4,
             layer: int = MIXTRAL_LAYER, hidden: int = SHAPE["hidden"]) -> dict:
    cmd = [sys.executable, "-m", "submoe", "compress", "--model", str(src), "--out", str(out),
           "--method", method, "--num-experts", str(num_experts), "--samples", str(samples),
           "--seq-len", str(CALIB["seq_len"]), "--output-tokens", str(CALIB["output_tokens"]),
           "--calib", *map(str, sorted((ROOT / "data" / "calib").glob("*.jsonl"))), "--no-progress", "--force",
           "--restart", *extra]
    t0 = time.time()
    peak_anon = run_sampling_anon(cmd)
    wall = time.time() - t0
    report = json.loads((out / "compression_report.json").read_text())
    shutil.rmtree(out)
    above = report["peak_rss_bytes"] - report["rss_before_weights_bytes"]
    activation_copy = samples * CALIB["seq_len"] * hidden * 4
    m = machine()
    return {"measured": f"{m['date']} at {m['commit']}", "machine": m, "wall_seconds": round(wall, 1),
            "peak_rss_bytes": report["peak_rss_bytes"],
            "rss_before_weights_bytes": report["rss_before_weights_bytes"],
            "source_bytes": report["sizes"]["source_weight_bytes"], "output_bytes": report["sizes"]["weight_bytes"],
            "layer_bytes": layer, "activation_copy_bytes": activation_copy, "samples": samples, "extra": list(extra),
            "peak_above_floor_in_layers": round(above / layer, 2), "peak_anon_bytes": peak_anon,
            "peak_anon_in_layers": round(peak_anon / layer, 2), "compress_seconds": report["time_seconds"],
            "calibration_seconds": report["calibration"]["seconds"], "moe_layers": sum(1 for l in report["layers"])}


# Real layer shapes (config fields of the published models), random bf16 weights: `layers` is the
# whole model's depth, for the extrapolation; a few layers of each are generated.
SHAPES = {
    "Qwen3-30B-A3B": dict(model_type="qwen3_moe", layers=48, fields=dict(
        hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, intermediate_size=6144,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True)),
    "Qwen3-235B-A22B": dict(model_type="qwen3_moe", layers=94, fields=dict(
        hidden_size=4096, moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, intermediate_size=12288,
        num_attention_heads=64, num_key_value_heads=4, head_dim=128, norm_topk_prob=True)),
    # 256 routed experts of hidden 7168: 22.5 GB of bf16 experts per layer, more than this machine's
    # memory. Its few layers start with one dense layer (V3 has three) so that one is an MoE layer.
    "DeepSeek-V3": dict(model_type="deepseek_v3", layers=61, fields=dict(
        hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        intermediate_size=18432, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8,
        topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True)),
}
SHAPE_LAYERS = 2


def shape_source(name: str, layers: int) -> Path:
    from offline.synthetic import sharded_random_moe
    src = BUILD / f"{name}-{layers}l"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        spec = SHAPES[name]
        sharded_random_moe(spec["model_type"], src, ROOT / "models" / "tiny-mixtral-8e", layers=layers, **spec["fields"])
    return src


def shape_row(name: str, method: str, layers: int, samples: int = CALIB["samples"], extra: tuple[str, ...] = ()) -> dict:
    """One method 50% on a few layers of a real shape: memory in stored layers, seconds per layer,
    the whole run against its calibration, and the whole model's time extrapolated from them.
    `extra`: more `submoe compress` options (e.g. the project's method at its best)."""
    from submoe_format.checkpoint import layout_for
    f = SHAPES[name]["fields"]
    n = f[layout_for({"model_type": SHAPES[name]["model_type"]}).num_experts_field]
    hidden, inter = f["hidden_size"], f["moe_intermediate_size"]
    layer = 3 * n * hidden * inter * 2
    row = compress(shape_source(name, layers), BUILD / "out", samples, *extra, method=method, num_experts=n // 2,
                   layer=layer, hidden=hidden)
    per_layer = row["compress_seconds"] / row["moe_layers"]
    return {"shape": name, "method": method, "experts": f"{n}->{n // 2}", "hidden": hidden, "intermediate": inter,
            "layers": layers, **row, "seconds_per_layer": round(per_layer, 1),
            "over_calibration": round(row["compress_seconds"] / max(row["calibration_seconds"], 1e-9), 2),
            "model_layers": SHAPES[name]["layers"], "extrapolated_hours": round(per_layer * SHAPES[name]["layers"] / 3600, 2)}


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
    b.set_xlabel("source checkpoint (GiB)"), b.set_ylabel("seconds")
    b.set_title(f"wall time ({rows[0]['machine']['cores']} CPU cores)")
    labels = ["in RAM", "spilled", "spilled,\nbatch 4"]
    c.bar(labels, [r["peak_rss_bytes"] / GiB for r in spill], label="peak RSS")
    c.bar(labels, [r["rss_before_weights_bytes"] / GiB for r in spill], label="before any weight")
    c.set_ylabel("GiB"), c.legend(fontsize=8, loc="lower right")
    c.set_title(f"{spill[0]['samples'] * CALIB['seq_len'] // 1024}k calibration tokens "
                f"({spill[0]['activation_copy_bytes'] / 2**20:.0f} MiB per copy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measured(row: dict) -> str:
    """When, at which commit and on how many cores a row was measured (rows are re-measured one by one)."""
    return f"{row['measured']}, {row['machine']['cores']} cores"


def markdown(rows: list[dict], spill: list[dict], shapes: list[dict]) -> str:
    lines = ["| layers | source | output | before weights | peak RSS | peak - before, in bf16 layers | wall time | "
             "measured |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['source_bytes'] / GiB:.2f} GiB | {r['output_bytes'] / GiB:.2f} GiB | "
                     f"{r['rss_before_weights_bytes'] / GiB:.2f} GiB | {r['peak_rss_bytes'] / GiB:.2f} GiB | "
                     f"{r['peak_above_floor_in_layers']} | {r['wall_seconds']:.0f} s | {measured(r)} |")
    if spill:
        lines += ["", f"Calibration activations ({spill[0]['samples']} x {CALIB['seq_len']} tokens, "
                  f"{spill[0]['activation_copy_bytes'] / 2**20:.0f} MiB per copy), {spill[0]['layers']} layers, "
                  f"measured {measured(spill[0])}:", "",
                  "| activations | peak RSS | peak - before, in bf16 layers | wall time |", "|---|---:|---:|---:|"]
        for name, r in zip(SPILL_VARIANTS, spill):
            lines.append(f"| {name} | {r['peak_rss_bytes'] / GiB:.2f} GiB | {r['peak_above_floor_in_layers']} | "
                         f"{r['wall_seconds']:.0f} s |")
    if shapes:
        lines += ["", f"Real layer shapes, {shapes[0]['layers']} layers each, 50% of the experts, "
                  f"{CALIB['samples'] * CALIB['seq_len'] // 1024}k calibration tokens unless the method says:", "",
                  "| shape | method | experts | one layer (bf16) | peak RSS - before, in bf16 layers | "
                  "peak anonymous memory, in bf16 layers | s per layer | whole / calibration | "
                  "whole model (extrapolated) | measured |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in shapes:
            anon = f"{r['peak_anon_bytes'] / GiB:.2f} GiB ({r['peak_anon_in_layers']})" if "peak_anon_bytes" in r else "–"
            method = " ".join([r["method"], *r.get("extra", [])]
                              + ([f"({r['samples']} windows)"] if r.get("samples", CALIB["samples"]) != CALIB["samples"] else []))
            lines.append(f"| {r['shape']} | {method} | {r['experts']} | {r['layer_bytes'] / GiB:.2f} GiB | "
                         f"{r['peak_above_floor_in_layers']} | {anon} | {r['seconds_per_layer']} | "
                         f"{r.get('over_calibration', '–')} | "
                         f"{r['extrapolated_hours']} h ({r['model_layers']} layers) | {measured(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,22,46", help="decoder layers of each model (about 0.19 GB each); '' for none")
    ap.add_argument("--shapes", default="Qwen3-30B-A3B", help=f"real layer shapes to run, of {list(SHAPES)}; '' for none")
    ap.add_argument("--methods", default="submoe,output-lsq,reap", help="methods run on each real shape")
    ap.add_argument("--shape-samples", type=int, default=CALIB["samples"], help="calibration windows for the shape rows")
    ap.add_argument("--shape-args", default="", help="more `submoe compress` options for the shape rows, e.g. "
                    "'--output-tokens 16384 --refine-steps 100' (the project's method at its best)")
    ap.add_argument("--no-spill", dest="spill", action="store_false", help="skip the activation-spilling comparison")
    ap.add_argument("--update", action="store_true", help="keep the parts of the JSON not run this time")
    ap.add_argument("--keep", action="store_true", help="keep the generated models in build/scaling")
    args = ap.parse_args()
    sizes = [int(n) for n in args.layers.split(",") if n]
    rows, spill, shapes = [], [], []
    for layers in sizes:
        src = ensure_source(layers)
        rows.append({"layers": layers, **compress(src, BUILD / "out", CALIB["samples"])})
        print(json.dumps(rows[-1]), flush=True)
        if layers == sizes[0] and args.spill:  # the spill comparison on the smallest model
            for extra in SPILL_VARIANTS.values():
                spill.append({"layers": layers, **compress(src, BUILD / "out", SPILL_SAMPLES, *extra)})
                print(json.dumps(spill[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(src)
    for name in [n for n in args.shapes.split(",") if n]:
        for method in args.methods.split(","):
            shapes.append(shape_row(name, method, SHAPE_LAYERS, args.shape_samples, tuple(args.shape_args.split())))
            print(json.dumps(shapes[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(BUILD / f"{name}-{SHAPE_LAYERS}l")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scaling.json"
    if args.update and path.is_file():  # this run's rows replace the saved rows they re-measure
        old = json.loads(path.read_text())
        rows = sorted({r["layers"]: r for r in old["rows"] + rows}.values(), key=lambda r: r["layers"])
        spill = spill or old["spill"]
        shapes = list({(r["shape"], r["method"]): r for r in old.get("shapes", []) + shapes}.values())
    meta = {"shape": SHAPE, "calibration": CALIB, "method": "submoe (full rank)", "num_experts": "8->4"}
    path.write_text(json.dumps({**meta, "rows": rows, "spill": spill, "shapes": shapes}, indent=2) + "\n")
    (RESULTS / "scaling.md").write_text(markdown(rows, spill, shapes))
    plot(rows, spill, RESULTS / "scaling.png")
    print(markdown(rows, spill, shapes))


if __name__ == "__main__":
    main()
