"""Quality benchmark: every method on the three stand-in models (8->6 and 8->4 on the two 8-expert
ones, 64->48, 32 and 16 on the fine-grained one), one harness, one table.

    make quality                            # the committed results: python benchmarks/quality.py
    python benchmarks/quality.py --quick    # a smoke run (the tests use it)

On 2 cores the main runs and ablations take about 85 minutes, the `ADDED` configurations (16k
sampled tokens, refinement, sequential calibration) about as long again.

Calibration comes from the shipped calibration split (all domains, round-robin), evaluation
from the held-out split of every domain: perplexity, KL(original || compressed), top-1
agreement and greedy-continuation agreement, with retention (original / compressed perplexity)
as mean and worst domain. Every figure is mean and spread over calibration seeds. Each
(model, seed) is calibrated once (`submoe calibrate`) and every method is a `submoe compress --stats`
on that statistics file: the statistics do not depend on the method, so they share one sample.
Writes benchmarks/results/quality.{json,md} and quality*.png, stamped with the machine (harness.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import (
    CALIB,
    MODELS,
    RESULTS,
    ROOT,
    Calibrations,
    EvalSettings,
    Evaluator,
    compressed,
    machine,
    source_experts,
    stamp,
    write_results,
)
from tqdm import tqdm

from offline.calibration.settings import Calibration
from offline.methods import METHODS
from submoe_format.texts import domain_name

# Experts kept, as fractions of the source's: 8->6, 8->4 on the 8-expert models; 64->48, 32, 16 on the fine-grained one.
FRACTIONS = {"fine-grained": [0.75, 0.5, 0.25]}
MAIN_METHODS = ["submoe", "output-lsq", "mergemoe", "hc-smoe", "m-smoe", "reap", "freq-prune", "average", "random"]
# Variants measured at the harder ratio only: Sub-MoE's adaptive and † settings, neuron alignment.
VARIANTS = [("submoe", {"adaptive": True}), ("submoe", {"intra_rank_ratio": 0.5}),
            *[(m, {"align_neurons": True}) for m in ("submoe", "output-lsq", "mergemoe", "m-smoe")]]
# More configurations, at 50% of the experts only, every seed: (method, method options, pipeline
# options). More sampled tokens help every least-squares fit, so MergeMoE is measured on the same 16k
# tokens as ours. `--add LABEL ...` re-measures some of them into the committed results.
REFINED = ("mergemoe", "m-smoe", "hc-smoe", "reap", "mone", "man")  # published methods also measured refined
ADDED = {
    "mergemoe@16k": ("mergemoe", {}, {"output_tokens": 16384}),
    "output-lsq@16k": ("output-lsq", {}, {"output_tokens": 16384}),
    "output-lsq+refine@16k": ("output-lsq", {}, {"output_tokens": 16384, "refine_steps": 100}),
    # REAM as published: the centroids' router rows (an N'-row checkpoint); neuron activations on 16k
    # sampled tokens (the authors sample 32k). And the same merge served through the remap tables.
    "ream": ("ream", {}, {"export": "vanilla", "output_tokens": 16384}),
    "ream+remap": ("ream", {}, {"output_tokens": 16384}),
    # Sequential (error-compensating) calibration: REAM's authors and llm-compressor's REAP calibrate so.
    "ream+seq": ("ream", {}, {"export": "vanilla", "output_tokens": 16384, "sequential": True}),
    "reap+seq": ("reap", {}, {"sequential": True}),
    "output-lsq+seq@16k": ("output-lsq", {}, {"output_tokens": 16384, "sequential": True}),
    "output-lsq+refine+seq@16k": ("output-lsq", {}, {"output_tokens": 16384, "refine_steps": 100, "sequential": True}),
    # Equal treatment: the refinement is a step after any merge, so published methods get it too, on
    # the same 16k sampled tokens.
    **{f"{m}+refine@16k": (m, {}, {"output_tokens": 16384, "refine_steps": 100})
       for m in REFINED},
    # Least-squares correction vectors per router expert (methods/correction.py), an idea of ours.
    "output-lsq+refine+correct@16k": ("output-lsq", {}, {"output_tokens": 16384, "refine_steps": 100, "correct": True}),
    # End-to-end distillation after the layer-wise steps (offline/distillation.py), another idea of ours.
    "output-lsq+refine+distill@16k": ("output-lsq", {}, {"output_tokens": 16384, "refine_steps": 100,
                                                         "distill_steps": 800}),
    # The same distillation after the best published merges, refined: what the grouping still contributes.
    **{f"{m}+refine+distill@16k": (m, {}, {"output_tokens": 16384, "refine_steps": 100, "distill_steps": 800})
       for m in ("mergemoe", "m-smoe", "reap")},
    # Both of output-lsq's W_D fits compressed, the one closer to the source on left-over calibration
    # text kept (`--choose-end-to-end`, offline/choice.py), another idea of ours.
    "output-lsq+choose+refine@16k": ("output-lsq", {}, {"output_tokens": 16384, "refine_steps": 100,
                                                        "choose_end_to_end": True}),
    # Prune and merge in one layer (output-lsq's --hybrid), another idea of ours.
    "output-lsq+hybrid+refine@16k": ("output-lsq", {"hybrid": True}, {"output_tokens": 16384, "refine_steps": 100}),
    # The recommended settings as a stock checkpoint (N'-row router; `submoe compress --preset stock`)
    "output-lsq+refine+vanilla@16k": ("output-lsq", {}, {"output_tokens": 16384, "refine_steps": 100,
                                                         "export": "vanilla"}),
}
FIGURES = ("kl", "top1_agreement", "retention_mean", "retention_worst", "greedy_first_divergence", "perplexity_mean")


@dataclass
class Settings(EvalSettings):
    models: dict[str, Path] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    samples: int = Calibration.samples
    output_tokens: int = Calibration.output_tokens
    fractions: list[float] = field(default_factory=lambda: [0.75, 0.5])  # unless FRACTIONS names the model
    methods: list[str] = field(default_factory=lambda: list(MAIN_METHODS))
    variants: list = field(default_factory=lambda: list(VARIANTS))
    added: list[str] = field(default_factory=lambda: list(ADDED))
    ablation_samples: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    ablation_sample_methods: list[str] = field(default_factory=lambda: ["submoe", "output-lsq", "mergemoe"])
    ablation_ranks: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 0.75])
    ablation_domains: list[str] = field(default_factory=lambda: [domain_name(p) for p in CALIB])
    ablation_domain_methods: list[str] = field(default_factory=lambda: ["submoe", "output-lsq"])
    ablation_seeds: list[int] = field(default_factory=lambda: [0])


def label(method: str, options: dict) -> str:
    """submoe+adaptive, submoe+†, hc-smoe+align, submoe+rank_ratio=0.5 ..."""
    short = {"adaptive": "adaptive", "align_neurons": "align", "intra_rank_ratio": "†"}
    return "+".join([method, *(short.get(k) or f"{k}={v}" for k, v in options.items())])


def run_one(cal: Calibrations, ev: Evaluator, tmp: Path, method: str, options: dict, n: int, seed: int,
            sources: list[str], samples: int, s: Settings, pipeline: dict | None = None) -> dict:
    """One configuration on one calibration: compress (the pipeline after calibration) and score.
    `pipeline`: CompressOptions fields beyond the benchmark's (output_tokens, refine_steps)."""
    pipeline = {"output_tokens": s.output_tokens, **(pipeline or {})}
    out = tmp / "ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.time()
        report, info = compressed(cal, out, method, n, seed, sources, samples, options, **pipeline)
        merge_seconds = time.time() - t0
    if info is None:  # calibrated within the run
        info = {"calibration_seconds": report["calibration"]["seconds"]}
    figures = ev.score(out)
    figures.update(method=method, label=label(method, options), options=options, num_experts=n, seed=seed,
                   samples=samples, calib=[domain_name(p) for p in sources], merge_seconds=merge_seconds,
                   calibration_seconds=info["calibration_seconds"], pipeline=pipeline,
                   weight_bytes=report["sizes"]["weight_bytes"], warnings=sorted({str(w.message) for w in caught}),
                   **({"end_to_end_choice": report["end_to_end_choice"]} if "end_to_end_choice" in report else {}),
                   moe_output_error=statistics.fmean(l["moe_output_relative_error"] for l in report["layers"]),
                   # The grouping's shape per MoE layer: why a method ranks as it does at 64 experts and at 8.
                   cluster_sizes=[sorted((len(c) for c in l["clusters"]), reverse=True) for l in report["layers"]],
                   dropped=[sum(i is None for i in l["expert_map"]) for l in report["layers"]])
    return figures


def summarise(runs: list[dict], keys=("label", "num_experts")) -> list[dict]:
    """Mean and spread (sample std; 0 for one seed) of every figure per configuration."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = dict(zip(keys, key), seeds=len(rs), method=rs[0]["method"])
        for f in FIGURES:
            vals = [r[f] for r in rs]
            row[f] = statistics.fmean(vals)
            row[f + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["worst_domain"] = statistics.mode(r["worst_domain"] for r in rs)
        rows.append(row)
    return rows


def run(s: Settings) -> dict:
    """Every model: each main method at each target and the variants at 50%, then the `ADDED`
    configurations at 50%, every seed; on one model, the ablations."""
    results = {"settings": {k: (v if not isinstance(v, dict) else {n: str(p) for n, p in v.items()})
                            for k, v in vars(s).items()}, "models": {}}
    results["settings"]["calibration_tokens"] = s.samples * s.seq_len
    with tempfile.TemporaryDirectory(prefix="submoe-quality-") as td:
        tmp = Path(td)
        for name, model_dir in s.models.items():
            t_start = time.time()
            ev, cal = Evaluator(model_dir, s), Calibrations(model_dir, tmp, s.seq_len, s.output_tokens)
            targets = targets_of(name, model_dir, s)
            half = half_target(targets, source_experts(model_dir))
            plan = [(m, {}, n) for n in targets for m in s.methods] + [(m, o, half) for m, o in s.variants]
            runs = []
            for seed in s.seeds:
                for m, o, n in tqdm(plan, desc=f"{name} seed {seed}", unit="run"):
                    runs.append(run_one(cal, ev, tmp, m, o, n, seed, CALIB, s.samples, s))
            runs += added_runs(s.added, cal, ev, tmp, half, s)
            entry = {"original": ev.original(), "source_experts": source_experts(model_dir), "targets": targets,
                     "shared_expert_output_share": ev.shared_share.per_layer(),
                     "runs": runs, "summary": summarise(runs)}
            if name == ablation_model(s):
                entry["ablations"] = ablations(cal, ev, tmp, half, s)
            entry["seconds"], entry["torch_threads"] = round(time.time() - t_start), torch.get_num_threads()
            results["models"][name] = entry
    return results


def configuration(label: str) -> tuple[str, dict, dict]:
    """(method, method options, pipeline options) of an `ADDED` label or a main method's name."""
    return ADDED[label] if label in ADDED else (label, {}, {})


def added_runs(labels: list[str], cal: Calibrations, ev: Evaluator, tmp: Path, n: int, s: Settings) -> list[dict]:
    runs = []
    for seed in s.seeds:
        for lab in tqdm(labels, desc=f"{cal.model_dir.name} seed {seed}: more configurations", unit="run"):
            method, options, pipeline = configuration(lab)
            runs.append({**run_one(cal, ev, tmp, method, options, n, seed, CALIB, s.samples, s, pipeline), "label": lab})
    return runs


def add(s: Settings, labels: list[str], earlier: dict, kept: list[float] | None = None) -> dict:
    """The committed results with the configurations `labels` re-measured at each fraction `kept` of
    the experts (None: the target nearest 50%), each model's summary recomputed; everything else
    kept as it was. One calibration per seed serves every fraction."""
    results = json.loads(json.dumps(earlier))
    with tempfile.TemporaryDirectory(prefix="submoe-quality-") as td:
        for name, model_dir in s.models.items():
            entry = results["models"][name]
            ev, cal = Evaluator(model_dir, s), Calibrations(model_dir, Path(td), s.seq_len, s.output_tokens)
            source = entry["source_experts"]
            targets = [half_target(entry["targets"], source)] if kept is None else \
                [max(1, round(f * source)) for f in kept]
            entry["targets"] = sorted({*entry["targets"], *targets}, reverse=True)
            runs = [r for r in entry["runs"] if not (r["label"] in labels and r["num_experts"] in targets)]
            for n in targets:
                runs += added_runs(labels, cal, ev, Path(td), n, s)
            entry["runs"], entry["summary"] = runs, summarise(runs)
    return results


def half_target(targets: list[int], source: int) -> int:
    """The target expert count closest to 50% of the source's."""
    return min(targets, key=lambda n: abs(n / source - 0.5))


def targets_of(name: str, model_dir: Path, s: Settings) -> list[int]:
    n = source_experts(model_dir)
    return [max(1, round(f * n)) for f in FRACTIONS.get(name, s.fractions) if round(f * n) < n]


def ablation_model(s: Settings) -> str:
    """Ablations run on one model: the shipped one when it is in the run."""
    return "upcycled" if "upcycled" in s.models else next(iter(s.models))


def ablations(cal: Calibrations, ev: Evaluator, tmp: Path, n: int, s: Settings) -> dict:
    out: dict[str, list] = {"samples": [], "domain_mismatch": [], "rank": []}
    for seed in s.ablation_seeds:
        for samples in tqdm(s.ablation_samples, desc="ablation: samples", unit="size"):
            for m in s.ablation_sample_methods:
                out["samples"].append(run_one(cal, ev, tmp, m, {}, n, seed, CALIB, samples, s))
        for spec in tqdm([p for p in CALIB if domain_name(p) in s.ablation_domains], desc="ablation: calib domain"):
            for m in s.ablation_domain_methods:
                out["domain_mismatch"].append(run_one(cal, ev, tmp, m, {}, n, seed, [spec], s.samples, s))
        for r in tqdm(s.ablation_ranks, desc="ablation: rank", unit="rank"):
            out["rank"].append(run_one(cal, ev, tmp, "submoe", {"rank_ratio": r}, n, seed, CALIB,
                                       s.samples, s))
    return out


# --- reporting -------------------------------------------------------------------------------

def kept_of(added: dict) -> list[float]:
    """The fractions an `added` entry measured (older entries: one number, or none for 50%)."""
    kept = added.get("kept", 0.5)
    return kept if isinstance(kept, list) else [kept]


def fmt(row: dict, f: str, digits: int = 3) -> str:
    return f"{row[f]:.{digits}f} ± {row[f + '_std']:.{digits}f}"


# The README's method table: these configurations at 50% of the experts, with their cost
README_ROWS = ["output-lsq+refine@16k", "output-lsq+choose+refine@16k", "m-smoe+refine@16k", "mergemoe+refine@16k",
               "hc-smoe+refine@16k", "reap+refine@16k", "mone+refine@16k", "man+refine@16k", "output-lsq", "submoe",
               "mergemoe", "m-smoe", "hc-smoe", "reap", "mone", "man", "freq-prune"]
README = ROOT / "README.md"
README_MARKERS = ("<!-- method-table: generated by benchmarks/quality.py from results/quality.json -->",
                  "<!-- end of method-table -->")


def half_rows(results: dict) -> dict[str, dict[str, dict]]:
    """label -> model -> its summary row at the target nearest 50% of the experts."""
    out: dict[str, dict[str, dict]] = {}
    for name, m in results["models"].items():
        half = half_target(m["targets"], m["source_experts"])
        for r in m["summary"]:
            if r["num_experts"] == half:
                out.setdefault(r["label"], {})[name] = r
    return out


def method_table(results: dict, cost: list[dict]) -> str:
    """Mean KL at 50% of the experts per stand-in (3 seeds) and the cost of one compression on the
    upcycled one (method_cost.json), for the README."""
    rows, models = half_rows(results), list(results["models"])
    seconds = {r["config"]: r["compress_seconds"] for r in cost if r["model"].startswith("upcycled")}
    head = "| method | " + " | ".join(f"{m} {results['models'][m]['source_experts']}→"
                                      f"{half_target(results['models'][m]['targets'], results['models'][m]['source_experts'])}"
                                      for m in models) + " | compress s (upcycled) |"
    lines = [head, "|---|" + "---:|" * (len(models) + 1)]
    for label in [lab for lab in README_ROWS if lab in rows]:
        cells = [f"{rows[label][m]['kl']:.4f}" if m in rows[label] else "" for m in models]
        cost_cell = f"{seconds[label]:.1f}" if label in seconds else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {cost_cell} |")
    return "\n".join(lines)


def readme_with(table: str, readme: str) -> str:
    start, end = README_MARKERS
    if start not in readme or end not in readme:
        return readme
    return readme[:readme.index(start) + len(start)] + "\n" + table + "\n" + readme[readme.index(end):]


# Published methods (the project's own is output-lsq; freq-prune, average and random are baselines).
PUBLISHED = ("submoe", "mergemoe", "hc-smoe", "m-smoe", "reap", "ream", "mone", "man", "msan")
OURS = "output-lsq+refine@16k"  # the recommended setting (`quality` preset)
DISTILLED = "output-lsq+refine+distill@16k"  # ours distilled, against the published methods distilled alike
CHOSEN = "output-lsq+choose+refine@16k"  # ours with the end-to-end choice of the W_D fit
IDEAS = {"output-lsq+refine+correct@16k": "least-squares correction vector per router expert (`--correct`)",
         DISTILLED: "end-to-end distillation, at most 800 steps (`--distill-steps 800`)",
         "output-lsq+hybrid+refine@16k": "prune-and-merge candidates per layer (`--hybrid`)",
         CHOSEN: "the end-to-end choice between two fits of W_D (`--choose-end-to-end`)"}


def fair_rows(results: dict, fraction: float) -> dict[str, dict]:
    """model -> the figures of the equal-treatment table at `fraction` of the experts kept: the best
    published method as published and with the same 16k tokens and refinement, ours, the ideas."""
    out = {}
    for name, m in results["models"].items():
        n = max(1, round(fraction * m["source_experts"]))
        rows = {r["label"]: r for r in m["summary"] if r["num_experts"] == n}
        published = [r for r in rows.values() if r["method"] in PUBLISHED and "+refine" not in r["label"]
                     and "+seq" not in r["label"]]

        def best(suffix: str) -> dict | None:
            """The published method with the least KL among the configurations `<method><suffix>`."""
            return min((r for lab, r in rows.items() if r["method"] in PUBLISHED and lab.endswith(suffix)),
                       key=lambda r: r["kl"], default=None)
        out[name] = {"n": n, "source": m["source_experts"],
                     "published": min(published, key=lambda r: r["kl"], default=None),
                     "refined": best("+refine@16k"), "distilled": best("+refine+distill@16k"),
                     "ours": rows.get(OURS), **{lab: rows.get(lab) for lab in ("mone", "man", "msan", *IDEAS)}}
    return out


def fair_table(results: dict) -> str:
    """The equal-treatment tables (50% and 25% of the experts kept) and the goals of issue 27."""
    parts = []
    half = fair_rows(results, 0.5)
    for fraction in (0.5, 0.25):
        f = fair_rows(results, fraction)
        models = [m for m in f if f[m]["ours"] or f[m]["published"]]
        if not models:
            continue
        def cell(r, d=4):
            if r is None:
                return ""
            spread = f" ± {r['kl_std']:.{d}f}" if r["seeds"] > 1 else ""
            return f"{r['kl']:.{d}f}{spread} ({r['label']}, {r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
        lines = [f"### {1 - fraction:.0%} of the experts removed", "",
                 "| mean KL | " + " | ".join(f"{m} {f[m]['source']}→{f[m]['n']}" for m in models) + " |",
                 "|---|" + "---:|" * len(models)]
        lines.append("| best published method, as published | " + " | ".join(cell(f[m]["published"]) for m in models) + " |")
        lines.append("| best published method, 16k tokens + the same refinement | " +
                     " | ".join(cell(f[m]["refined"]) for m in models) + " |")
        for lab in ("mone", "man", "msan"):
            if any(f[m][lab] for m in models):
                lines.append(f"| {lab}, as published | " + " | ".join(cell(f[m][lab]) for m in models) + " |")
        lines.append(f"| **ours: {OURS}** | " + " | ".join(cell(f[m]["ours"]) for m in models) + " |")
        for lab, what in IDEAS.items():
            if any(f[m][lab] for m in models):
                lines.append(f"| ours + {what} | " + " | ".join(cell(f[m][lab]) for m in models) + " |")
        if any(f[m]["distilled"] for m in models):
            lines.append("| best published method, refined + the same distillation | " +
                         " | ".join(cell(f[m]["distilled"]) for m in models) + " |")

        def ratio(m, against, ours="ours"):
            a, b = f[m][ours], f[m][against]
            return f"{a['kl'] / b['kl']:.2f}" if a and b else ""
        lines.append("| ours / best published, refined (goal at 50%: ≤ 0.5) | " +
                     " | ".join(ratio(m, "refined") for m in models) + " |")
        lines.append("| ours / best published, as published | " + " | ".join(ratio(m, "published") for m in models) + " |")
        if any(f[m][CHOSEN] for m in models):
            lines.append("| ours + the end-to-end choice / best published, refined | " +
                         " | ".join(ratio(m, "refined", CHOSEN) for m in models) + " |")
        if any(f[m]["distilled"] and f[m][DISTILLED] for m in models):
            lines.append("| both distilled: ours / best published | " +
                         " | ".join(ratio(m, "distilled", DISTILLED) for m in models) + " |")
        if fraction == 0.5:
            lines.append("| ours: perplexity retention mean (worst domain); goal ≥ 0.95 (≥ 0.90) | " + " | ".join(
                "" if not f[m]["ours"] else f"{f[m]['ours']['retention_mean']:.3f} ({f[m]['ours']['retention_worst']:.3f})"
                for m in models) + " |")
        else:
            def best_half(m):
                rs = [r for r in (half[m]["published"], half[m]["refined"]) if r]
                return min(rs, key=lambda r: r["kl"]) if rs else None
            lines.append("| best published method at 50% (goal: ours at 75% ≤ it) | " +
                         " | ".join(cell(best_half(m)) for m in models) + " |")
        parts += lines + [""]
    return "\n".join(parts)


def main_table(results: dict) -> str:
    models = list(results["models"])
    cols = [(m, results["models"][m]["source_experts"], n) for m in models for n in results["models"][m]["targets"]]
    head = "| method |" + "".join(f" {m} {src}→{n} KL | {m} {src}→{n} retention (worst) |" for m, src, n in cols)
    lines = [head, "|---|" + "---:|---:|" * len(cols)]
    labels = list(dict.fromkeys(r["label"] for m in models for r in results["models"][m]["summary"]))
    for lab in labels:
        cells = []
        for m in models:
            rows = {r["num_experts"]: r for r in results["models"][m]["summary"] if r["label"] == lab}
            for n in results["models"][m]["targets"]:
                r = rows.get(n)
                cells += ["", ""] if r is None else [fmt(r, "kl"), f"{r['retention_mean']:.3f} ({r['retention_worst']:.3f})"]
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(summary: list[dict], original: dict, source_experts: int) -> str:
    lines = ["| method | experts | KL | top-1 | ppl retention mean | worst (domain) | greedy first divergence | mean ppl |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| original | {source_experts} | 0 | 1 | 1 | 1 | {original['greedy_first_divergence']:.0f} | "
             f"{original['perplexity_mean']:.2f} |"]
    for r in sorted(summary, key=lambda r: (-r["num_experts"], r["kl"])):
        lines.append(f"| {r['label']} | {r['num_experts']} | {fmt(r, 'kl')} | {fmt(r, 'top1_agreement')} | "
                     f"{fmt(r, 'retention_mean')} | {r['retention_worst']:.3f} ({r['worst_domain']}) | "
                     f"{fmt(r, 'greedy_first_divergence', 1)} | {r['perplexity_mean']:.2f} |")
    return "\n".join(lines)


def provenance(added: list[dict], models: list[str]) -> list[str]:
    """Where and when each configuration added after the main run was measured: its latest
    measurement only (a label a later `--add` re-measured on the same model and fraction is left
    out), one line per measurement naming the models it ran on."""
    latest: set[tuple] = set()
    lines: dict[str, list[str]] = {}
    for a in reversed(added):
        known = a.get("models") or []  # older entries do not say, so they may have run on any model
        current = [(lab, k) for lab in a["labels"] for k in kept_of(a)
                   if any((lab, k, m) not in latest for m in known or models)]
        latest |= {(lab, k, m) for lab in a["labels"] for k in kept_of(a) for m in known}
        if current:
            seeds = "" if a.get("seeds", [0, 1, 2]) == [0, 1, 2] else f", seeds {a['seeds']}"
            kept, labels = dict.fromkeys(k for _, k in current), dict.fromkeys(lab for lab, _ in current)
            line = (f"at {' and '.join(f'{k:.0%}' for k in kept)} of the experts{seeds}: "
                    f"{', '.join(labels)} ({stamp(a['machine'])})")
            lines[line] = [*known, *lines.get(line, [])]
    return [f"Re-measured later{' on ' + ', '.join(dict.fromkeys(ms)) if ms else ''} {line}\n"
            for line, ms in reversed(lines.items())]


def to_markdown(results: dict) -> str:
    s = results["settings"]
    parts = ["# Quality benchmark", "",
             f"Calibration: {s['samples']} windows x {s['seq_len']} tokens ({s['calibration_tokens']} tokens) from "
             f"every domain's calibration split; expert outputs on {s['output_tokens']} sampled tokens. Evaluation: "
             f"{s['eval_windows']} held-out windows per domain; greedy continuations of {s['prompts_per_domain']} "
             f"prompts per domain, {s['new_tokens']} tokens. Mean ± sample std over seeds {s['seeds']}. "
             f"KL = mean KL(original ‖ compressed) per token; retention = original / compressed perplexity.", "",
             "## At equal treatment", "",
             "Every published method as its authors run it and with the project's 16k sampled tokens and "
             "100 refinement steps; ours is the recommended setting; each idea is a row of its own.", "",
             "<!-- --8<-- [start:fair] -->", fair_table(results), "<!-- --8<-- [end:fair] -->", "",
             "## Main table", "", main_table(results)]
    for name, m in results["models"].items():
        parts += ["", f"## {name}", "", detail_table(m["summary"], m["original"], m["source_experts"])]
        if "ablations" in m:
            a, ratio = m["ablations"], f"{m['source_experts']}→{m['ablations']['samples'][0]['num_experts']}"
            parts += ["", f"### Ablation: calibration samples ({ratio})", "", "| method | samples | KL | retention | warnings |",
                      "|---|---:|---:|---:|---|"]
            parts += [f"| {r['label']} | {r['samples']} | {r['kl']:.4f} | {r['retention_mean']:.3f} | "
                      f"{'collapse warning' if r['warnings'] else ''} |" for r in a["samples"]]
            parts += ["", f"### Ablation: calibrated on one domain only ({ratio}), evaluated on all", "",
                      "| method | calibration | KL mean | KL on own domain | worst retention (domain) |",
                      "|---|---|---:|---:|---|"]
            parts += [f"| {r['label']} | {r['calib'][0]} | {r['kl']:.4f} | {r['domains'][r['calib'][0]]['kl']:.4f} | "
                      f"{r['retention_worst']:.3f} ({r['worst_domain']}) |" for r in a["domain_mismatch"]]
            parts += ["", f"### Ablation: Sub-MoE rank ({ratio})", "", "| rank ratio | KL | retention |", "|---:|---:|---:|"]
            parts += [f"| {r['options']['rank_ratio']} | {r['kl']:.4f} | {r['retention_mean']:.3f} |" for r in a["rank"]]
    parts += ["", *provenance(results.get("added", []), list(results["models"]))]
    parts += ["", "Benchmark time: " + ", ".join(f"{n} {m['seconds']} s ({m['torch_threads']} torch threads)"
                                                 for n, m in results["models"].items()) + "."]
    return "\n".join(parts) + "\n"


def plot(results: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    width = max(len(results["models"][m]["targets"]) for m in models)
    fig, axes = plt.subplots(len(models), width, figsize=(6 * width, 3.6 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for ax in axes[i][len(results["models"][m]["targets"]):]:
            ax.axis("off")
        for j, n in enumerate(results["models"][m]["targets"]):
            rows = sorted((r for r in results["models"][m]["summary"] if r["num_experts"] == n), key=lambda r: r["kl"])
            ax = axes[i][j]
            ax.barh([r["label"] for r in rows], [r["kl"] for r in rows], xerr=[r["kl_std"] for r in rows],
                    color=["tab:green" if r["method"] == "output-lsq" else "tab:blue" for r in rows])
            ax.invert_yaxis()
            ax.set_title(f"{m}: {results['models'][m]['source_experts']}→{n} experts")
            ax.set_xlabel("KL(original ‖ compressed), lower is better")
    fig.tight_layout()
    paths = [out_dir / f"{stem}.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    with_ablations = [m for m in models if "ablations" in results["models"][m]]
    if with_ablations:
        m = results["models"][with_ablations[0]]
        a, ratio = m["ablations"], f"{m['source_experts']}→{m['ablations']['samples'][0]['num_experts']}"
        fig, axes = plt.subplots(1, 3, figsize=(16, 4))
        for meth in dict.fromkeys(r["label"] for r in a["samples"]):
            rs = [r for r in a["samples"] if r["label"] == meth]
            axes[0].plot([r["samples"] for r in rs], [r["kl"] for r in rs], marker="o", label=meth)
        axes[0].set(xscale="log", xlabel=f"calibration samples (windows of {results['settings']['seq_len']} tokens)", ylabel="KL",
                    title=f"calibration size ({ratio})")
        axes[0].legend()
        for meth in dict.fromkeys(r["label"] for r in a["domain_mismatch"]):
            rs = [r for r in a["domain_mismatch"] if r["label"] == meth]
            axes[1].bar([f"{r['calib'][0]}\n{meth}" for r in rs], [r["kl"] for r in rs], label=meth)
        axes[1].tick_params(axis="x", labelsize=6)
        axes[1].set(ylabel="KL (all domains)", title=f"calibrated on one domain ({ratio})")
        rs = a["rank"]
        axes[2].plot([r["options"]["rank_ratio"] for r in rs], [r["kl"] for r in rs], marker="o")
        axes[2].set(xlabel="Sub-MoE rank ratio", ylabel="KL", title=f"Sub-MoE rank ({ratio})")
        fig.tight_layout()
        paths.append(out_dir / f"{stem}_ablations.png")
        fig.savefig(paths[1], dpi=110)
        plt.close(fig)
    return paths


def quick_settings(models: dict[str, Path]) -> Settings:
    return Settings(models=models, seeds=[0], samples=8, seq_len=64, output_tokens=512, eval_windows=2,
                    prompts_per_domain=1, prompt_len=16, new_tokens=8, fractions=[0.5],
                    variants=[("submoe", {"adaptive": True}), ("submoe", {"intra_rank_ratio": 0.5}),
                              ("hc-smoe", {"align_neurons": True})],
                    ablation_samples=[4, 8], ablation_sample_methods=["mergemoe"], ablation_ranks=[0.5],
                    ablation_domains=[domain_name(CALIB[0])], ablation_domain_methods=["submoe"], added=[])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings, one model, one seed: checks the harness")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--add", nargs="+", choices=[*ADDED, *METHODS], metavar="LABEL",
                    help=f"measure only these configurations (of {list(ADDED)}, or a method by name) at 50%% of the "
                         "experts (or --kept) and add them to the committed JSON, replacing their earlier rows")
    ap.add_argument("--kept", type=float, nargs="+", metavar="FRACTION",
                    help="with --add: the fractions of each model's experts kept, e.g. 0.5 0.25 (8->4 and 8->2)")
    ap.add_argument("--update", action="store_true",
                    help="keep the other models' results already in the JSON; replace only the models run")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    models = {m: MODELS[m] for m in args.models}
    missing = [str(p) for p in models.values() if not (p / "config.json").is_file()]
    if missing:
        print(f"quality: missing model(s) {missing}: run `make model` (or pass --models)", file=sys.stderr)
        return 2
    s = quick_settings(models) if args.quick else Settings(models=models, seeds=args.seeds)
    measured_on = machine()
    stem = "quality-quick" if args.quick else "quality"
    earlier = args.out / f"{stem}.json"
    if args.add:
        if not earlier.is_file():
            print(f"quality: --add extends {earlier}, which does not exist: run the benchmark first", file=sys.stderr)
            return 2
        results = add(s, args.add, json.loads(earlier.read_text()), args.kept)
        results["added"] = [*results.get("added", []),
                            {"labels": args.add, "kept": args.kept or [0.5], "seeds": args.seeds,
                             "models": args.models, "machine": measured_on}]
        measured_on = results.pop("machine", None)  # the stamp of the run that measured the rest
    else:
        results = run(s)
    if args.update and not args.add and earlier.is_file():
        kept = json.loads(earlier.read_text())["models"]
        for n, entry in kept.items():  # results from before per-model targets: 8 experts, 8->6 and 8->4
            entry.setdefault("source_experts", 8)
            entry.setdefault("targets", sorted({r["num_experts"] for r in entry["runs"]}, reverse=True))
        results["models"] = {n: results["models"].get(n) or kept[n] for n in MODELS if n in kept or n in results["models"]}
    write_results(args.out, stem, results, to_markdown(results), measured_on)
    plot(results, args.out, stem)
    cost = args.out / "method_cost.json"
    if not args.quick and cost.is_file():  # the README's method table follows the results
        README.write_text(readme_with(method_table(results, json.loads(cost.read_text())["rows"]), README.read_text()))
    print(main_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
