"""Serving benchmark: what expert reduction buys a deployment, measured in one run.

    python benchmarks/serving.py [--out benchmarks/results] [--work build/serving-bench]

The shipped model is too small to show speed (framework overhead dominates), so a mid-size
Mixtral with random weights (~1.2 GB in bf16) is generated on the fly and compressed 8->4 with
Sub-MoE, exported twice from the same merge: `remap` (router over the 8 source experts, remap
tables, served by the plugin) and `vanilla` (a stock 4-expert Mixtral). Random weights make
quality meaningless here; speed and memory depend only on shapes and expert counts.

1. sweep           original / compressed (remap) / vanilla-4e, closed loop at 1, 4, 16, 64 and
                   a Poisson open loop, with `submoe loadtest`'s machinery. remap / vanilla is
                   the cost of the remap itself.
2. equal budget    original and compressed given the same memory for weights + KV cache
                   (`--kv-cache-memory-bytes` = budget - the model's weight bytes): the KV blocks
                   each gets, the sequences each fits, and throughput/latency with long prompts
                   at high concurrency (preemptions counted from vLLM's /metrics).
3. soak            the shipped model compressed 8->4: 1,000 requests at concurrency 32; failures
                   and resident-memory growth after warm-up.
4. cross-check     one point of the soak server measured again with `vllm bench serve` on the
                   same prompts.

Writes serving.json, serving.md and serving.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offline.compress import compress
from offline.options import CompressOptions
from offline.synthetic import random_mixtral
from serving.launcher import VLLMServer, vllm_executable
from serving.loadtest.cli import LoadTestOptions, measure, run, run_phase
from serving.loadtest.workload import held_out_prompts

SHIPPED = ROOT / "models" / "tiny-mixtral-8e"
CALIB = sorted(str(p) for p in (ROOT / "data" / "calib").glob("*.jsonl"))
EVAL = sorted(str(p) for p in (ROOT / "data" / "eval").glob("*.jsonl"))
MID = dict(hidden=1024, intermediate=2816, layers=8, experts=8, top_k=2, heads=16, kv_heads=4, vocab=4096)
MAX_MODEL_LEN = 1024


def build_models(work: Path) -> dict:
    """The mid-size source and its two 8->4 exports (reused when already built)."""
    import torch
    src, remap, vanilla = work / "mid-8e", work / "mid-submoe-4e", work / "mid-vanilla-4e"
    cost = {}
    if not (src / "config.json").exists():
        random_mixtral(src, SHIPPED, dtype=torch.bfloat16, std=0.02, **MID)
    for out, export in ((remap, "remap"), (vanilla, "vanilla")):
        if not (out / "config.json").exists():
            report = compress(CompressOptions(model=str(src), out=out, method="submoe", num_experts=4, calib=CALIB,
                                              samples=32, seq_len=128, export=export, force=True))
            cost[export] = {"seconds": report["time_seconds"], "peak_rss_bytes": report["peak_rss_bytes"]}
    return {"source": src, "remap": remap, "vanilla": vanilla, "compression_cost": cost}


def sweep(models: dict, work: Path) -> dict:
    opts = LoadTestOptions(
        targets=[str(models["source"]), str(models["remap"]), str(models["vanilla"])],
        labels=["original-8e", "submoe-4e (remap)", "vanilla-4e"], data=EVAL, out=work / "sweep",
        concurrency=[1, 4, 16, 64], waves=1, min_requests=8, rate=2.0, rate_requests=32, max_tokens=32, prompt_length=64,
        prompt_tokens=True, quality_prompts=4, serve_args=["--max-model-len", str(MAX_MODEL_LEN)],
        force=True)  # --work is the benchmark's own scratch space
    return run(opts)


def equal_budget(models: dict, work: Path, sweep_result: dict, headroom: float) -> dict:
    """Same bytes for weights + KV cache: the original gets `headroom` x its weights in KV."""
    weights = {d["label"]: int(d["compression"]["weight_bytes"]) for d in sweep_result["deployments"]}
    budget = int(weights["original-8e"] * (1 + headroom))
    results = []
    for label, path in (("original-8e", models["source"]), ("submoe-4e (remap)", models["remap"])):
        kv = budget - weights[label]
        opts = LoadTestOptions(
            targets=[str(path)], labels=[label], data=EVAL, out=work / f"budget-{label.split()[0]}",
            concurrency=[16], requests=32, max_tokens=64, prompt_length=512, prompt_tokens=True, quality_prompts=1,
            serve_args=["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(kv)], force=True)
        d = run(opts)["deployments"][0]
        e = d["engine"]
        tokens = e["kv_cache_blocks"] * e["block_size"]
        results.append({"label": label, "weight_bytes": weights[label], "kv_cache_bytes": kv,
                        "kv_cache_blocks": e["kv_cache_blocks"], "kv_cache_tokens": tokens,
                        "sequences_that_fit": tokens // (512 + 64), "preemptions": e["preemptions_during_run"],
                        "load": _strip(d["closed_loop"][0]), "memory": d["memory"]})
    return {"budget_bytes": budget, "prompt_tokens": 512, "output_tokens": 64, "concurrency": 16, "requests": 32,
            "deployments": results}


def soak_and_cross_check(work: Path, soak_requests: int) -> dict:
    tiny = work / "tiny-submoe-4e"
    if not (tiny / "config.json").exists():
        compress(CompressOptions(model=str(SHIPPED), out=tiny, method="submoe", num_experts=4, calib=CALIB,
                                 samples=64, seq_len=128, force=True))
    opts = LoadTestOptions(targets=[str(tiny)], labels=["tiny-submoe-4e"], data=EVAL, out=work / "soak",
                           concurrency=[32], requests=64, max_tokens=16, prompt_length=64, prompt_tokens=True,
                           quality_prompts=1, soak_requests=soak_requests, soak_concurrency=32)
    from transformers import AutoTokenizer
    prompts = held_out_prompts(EVAL, 512, 64, 0, AutoTokenizer.from_pretrained(str(tiny)))
    with VLLMServer(str(tiny), log_path=work / "soak-serve.log") as server:
        d, _ = measure("tiny-submoe-4e", server.base_url, server.pid, prompts, opts, None)
        # cross-check: the same 64 prompts at concurrency 8, once with ours, once with `vllm bench serve`
        ours = _strip(run_phase(server.base_url, None, d["model"], prompts[:64], 32, None, concurrency=8))
        theirs = vllm_bench(server.base_url, d["model"], str(tiny), work / "bench", requests=64, concurrency=8,
                            input_len=64, output_len=32)
    return {"soak": d["soak"], "memory": d["memory"],
            "cross_check": {"concurrency": 8, "requests": 64, "output_tokens": 32, "submoe_loadtest": ours,
                            "vllm_bench_serve": theirs}}


def vllm_bench(base_url: str, model: str, tokenizer: str, out: Path, requests: int, concurrency: int,
               input_len: int, output_len: int) -> dict:
    """`vllm bench serve` at the same point: its random dataset at the same prompt and output
    lengths (its custom-file dataset would need pandas, which vLLM does not install)."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([vllm_executable(), "bench", "serve", "--backend", "openai", "--base-url", base_url,
                    "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
                    "--random-input-len", str(input_len), "--random-output-len", str(output_len),
                    "--random-range-ratio", "0", "--num-prompts", str(requests), "--max-concurrency", str(concurrency),
                    "--ignore-eos", "--save-result", "--result-dir", str(out), "--result-filename", "bench.json",
                    "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm"],
                   check=True, env=os.environ)
    r = json.loads((out / "bench.json").read_text())
    keys = ("completed", "failed", "duration", "request_throughput", "output_throughput", "median_ttft_ms",
            "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms")
    return {k: r.get(k) for k in keys}


def _strip(phase: dict) -> dict:
    return {k: v for k, v in phase.items() if k != "records"}


def ratios_table(sweep_result: dict) -> list[dict]:
    """Per concurrency: compressed/original and remap/vanilla throughput and p50 latencies."""
    by = {d["label"]: {p["concurrency"]: p for p in d["closed_loop"]} for d in sweep_result["deployments"]}
    rows = []
    for c in sweep_result["config"]["concurrency"]:
        o, r, v = by["original-8e"][c], by["submoe-4e (remap)"][c], by["vanilla-4e"][c]
        rows.append({"concurrency": c,
                     "throughput_compressed_over_original": r["output_tokens_per_s"] / o["output_tokens_per_s"],
                     "itl_p50_compressed_over_original": r["itl_s"]["p50"] / o["itl_s"]["p50"],
                     "ttft_p50_compressed_over_original": r["ttft_s"]["p50"] / o["ttft_s"]["p50"],
                     "e2e_p50_compressed_over_original": r["e2e_s"]["p50"] / o["e2e_s"]["p50"],
                     "throughput_remap_over_vanilla": r["output_tokens_per_s"] / v["output_tokens_per_s"],
                     "e2e_p50_vanilla_over_remap": v["e2e_s"]["p50"] / r["e2e_s"]["p50"]})
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for d in result["sweep"]["deployments"]:
        xs = [p["concurrency"] for p in d["closed_loop"]]
        axes[0].plot(xs, [p["output_tokens_per_s"] for p in d["closed_loop"]], marker="o", label=d["label"])
        axes[1].plot(xs, [p["itl_s"]["p50"] * 1e3 for p in d["closed_loop"]], marker="o", label=d["label"])
        axes[2].plot(xs, [p["e2e_s"]["p99"] * 1e3 for p in d["closed_loop"]], marker="o", label=d["label"])
    for ax, title in zip(axes[:3], ("output tokens/s", "inter-token latency p50 (ms)", "end-to-end p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_title(f"mid-size MoE: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    eb = result["equal_budget"]["deployments"]
    labels = [d["label"] for d in eb]
    bars = [d["kv_cache_tokens"] / 1e3 for d in eb]
    axes[3].bar(labels, bars, color=["tab:blue", "tab:orange"])
    for i, d in enumerate(eb):
        axes[3].text(i, bars[i], f"{d['load']['output_tokens_per_s']:.0f} tok/s\n{d['preemptions']:.0f} preemptions",
                     ha="center", va="bottom", fontsize=8)
    axes[3].set_title(f"equal budget {result['equal_budget']['budget_bytes'] / 2**30:.2f} GiB: KV cache (k tokens)")
    axes[3].margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    sw, eb, sk = result["sweep"], result["equal_budget"], result["soak"]
    by = {d["label"]: d for d in sw["deployments"]}
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = ["# Serving benchmark", "", f"Machine: {result['machine']}. One run, {result['date']}.", "",
             f"Mid-size random Mixtral: hidden {MID['hidden']}, intermediate {MID['intermediate']}, {MID['layers']} "
             f"layers, {MID['experts']} experts top-{MID['top_k']}, bf16; compressed 8->4 with Sub-MoE.", "",
             "| deployment | experts/layer | weight bytes | server memory idle (PSS) |", "|---|---|---|---|"]
    for d in sw["deployments"]:
        lines.append(f"| {d['label']} | {d['compression']['experts_per_layer'][0]} | {mb(d['compression']['weight_bytes'])} "
                     f"| {mb(d['memory']['idle_pss_bytes'])} |")
    o, r = by["original-8e"]["compression"]["weight_bytes"], by["submoe-4e (remap)"]["compression"]["weight_bytes"]
    lines += ["", f"Compressed / original weight bytes: **{r / o:.3f}**.", "",
              "## Throughput and latency ratios (closed loop)", "",
              "| concurrency | tok/s compressed/original | ITL p50 c/o | TTFT p50 c/o | E2E p50 c/o | "
              "tok/s remap/vanilla (cost of the remap) |", "|---|---|---|---|---|---|"]
    for row in result["ratios"]:
        lines.append(f"| {row['concurrency']} | {row['throughput_compressed_over_original']:.3f} | "
                     f"{row['itl_p50_compressed_over_original']:.3f} | {row['ttft_p50_compressed_over_original']:.3f} | "
                     f"{row['e2e_p50_compressed_over_original']:.3f} | {row['throughput_remap_over_vanilla']:.3f} |")
    lines += ["", "## Equal memory budget", "",
              f"Budget {mb(eb['budget_bytes'])} for weights + KV cache; {eb['requests']} requests of "
              f"{eb['prompt_tokens']} prompt + {eb['output_tokens']} output tokens at concurrency {eb['concurrency']}.", "",
              "| deployment | weights | KV cache | KV blocks | sequences that fit | preemptions | tok/s | TTFT p50 | E2E p99 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for d in eb["deployments"]:
        ld = d["load"]
        lines.append(f"| {d['label']} | {mb(d['weight_bytes'])} | {mb(d['kv_cache_bytes'])} | {d['kv_cache_blocks']} | "
                     f"{d['sequences_that_fit']} | {d['preemptions']:.0f} | {ld['output_tokens_per_s']:.1f} | "
                     f"{ld['ttft_s']['p50']:.2f} s | {ld['e2e_s']['p99']:.2f} s |")
    s, cc = sk["soak"], sk["cross_check"]
    ours, theirs = cc["submoe_loadtest"], cc["vllm_bench_serve"]
    lines += ["", "## Soak (shipped model compressed 8->4)", "",
              f"{s['requests']} requests at concurrency {s['concurrency']}: **{s['errors']} failed**; resident memory "
              f"(PSS, all server processes) {mb(s['memory_after_warmup'])} after warm-up, peak {mb(s['memory_peak'])}: "
              f"growth **{s['memory_growth'] * 100:+.2f}%**; {s['requests_per_s']:.1f} requests/s.", "",
              f"## Cross-check with `vllm bench serve` ({cc['requests']} prompts, concurrency {cc['concurrency']}, "
              f"{cc['output_tokens']} output tokens)", "",
              "| | output tok/s | req/s | TTFT p50 ms | ITL p50 ms | E2E p50 ms |", "|---|---|---|---|---|---|",
              f"| submoe loadtest | {ours['output_tokens_per_s']:.1f} | {ours['requests_per_s']:.2f} | "
              f"{ours['ttft_s']['p50'] * 1e3:.1f} | {ours['itl_s']['p50'] * 1e3:.1f} | {ours['e2e_s']['p50'] * 1e3:.1f} |",
              f"| vllm bench serve | {theirs['output_throughput']:.1f} | {theirs['request_throughput']:.2f} | "
              f"{theirs['median_ttft_ms']:.1f} | {theirs['median_itl_ms']:.1f} | {theirs['median_e2el_ms']:.1f} |", "",
              "![serving](serving.png)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "serving-bench")
    ap.add_argument("--resume", action="store_true", help="reuse a finished sweep found in --work")
    ap.add_argument("--soak-requests", type=int, default=1000)
    ap.add_argument("--headroom", type=float, default=0.03,
                    help="equal budget: the original's KV cache as a fraction of its weight bytes (default 0.03)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = build_models(args.work)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
              "mid_model": MID, "compression_cost": models["compression_cost"]}
    def phase(name: str, measure_it):
        """Each phase's result is kept in --work; --resume reuses the ones a killed run finished."""
        saved = args.work / f"{name}.json"
        if not (args.resume and saved.exists()):
            saved.write_text(json.dumps(measure_it()))
        return json.loads(saved.read_text())

    result["sweep"] = phase("sweep", lambda: sweep(models, args.work))
    result["ratios"] = ratios_table(result["sweep"])
    result["equal_budget"] = phase("equal_budget", lambda: equal_budget(models, args.work, result["sweep"],
                                                                         args.headroom))
    result["soak"] = phase("soak", lambda: soak_and_cross_check(args.work, args.soak_requests))
    result["wall_seconds"] = time.time() - t0
    for d in result["sweep"]["deployments"]:
        for phase in d["closed_loop"] + ([d["open_loop"]] if d.get("open_loop") else []):
            phase.pop("records", None)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(result))
    plot(result, args.out / "serving.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
