"""Serving benchmark: what expert reduction buys a deployment, measured so it can be believed.

    python benchmarks/serving.py [--out benchmarks/results] [--work build/serving-bench] [--rounds 5]

The shipped model is too small to show speed (framework overhead dominates), so two mid-size
models with random weights are generated on the fly, each compressed to half its experts with
Sub-MoE and exported twice from the same merge: `remap` (router over the source experts, remap
tables, served by the plugin) and `vanilla` (a stock model with half the experts):

    mixtral-mid   Mixtral layout, 8 experts top-2, ~1.1 GB in bf16, 8 -> 4
    qwen3-fine    Qwen3-MoE layout, 64 experts top-8 (fine-grained), ~1.6 GB in bf16, 64 -> 32

Random weights make quality meaningless here; speed and memory depend only on shapes and
expert counts.

1. interleaved     per model, original / remap / vanilla all up at once; `--rounds` rounds, each
                   sending the same fresh prompts to all three at every concurrency, in an order
                   that rotates (`submoe loadtest --rounds`). Every ratio (compressed/original,
                   remap/vanilla) is taken within a round: its median and range over the rounds.
2. equal budget    per model, original and compressed given the same memory for weights + KV
                   cache (`--kv-cache-memory-bytes` = budget - the model's weight bytes), both up
                   at once in interleaved rounds: the KV blocks each gets, the sequences each
                   fits, and throughput/latency with long prompts at high concurrency
                   (preemptions counted from vLLM's /metrics).
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
import subprocess
import time
from pathlib import Path

from harness import CALIB, EVAL, ROOT, machine, stamp

from offline.compress import compress
from offline.options import CompressOptions
from offline.synthetic import random_mixtral, sharded_random_moe
from serving.launcher import VLLMServer, vllm_executable
from serving.loadtest.cli import LoadTestOptions, measure, run, run_phase
from serving.loadtest.interleave import round_ratios
from serving.loadtest.report import spread_cell
from serving.loadtest.workload import held_out_prompts
from submoe_format.checkpoint import safetensors_bytes

SHIPPED = ROOT / "models" / "tiny-mixtral-8e"
MID = dict(hidden=1024, intermediate=2816, layers=8, experts=8, top_k=2, heads=16, kv_heads=4, vocab=4096)
# Qwen3-MoE layout, fine-grained: 64 narrow experts, top-8 (Qwen3-30B-A3B's expert count at a
# tenth of its width and depth).
FINE = dict(hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_experts_per_tok=8, intermediate_size=3072,
            num_attention_heads=16, num_key_value_heads=4, head_dim=64, norm_topk_prob=True)
FINE_LAYERS = 10
MAX_MODEL_LEN = 1024
CONCURRENCY = [1, 8, 32]
LABELS = ("original", "submoe (remap)", "vanilla")


def build_models(work: Path) -> dict:
    """Each model's source and its two exports at half the experts (reused when already built)."""
    import torch
    sources = {"mixtral-mid": (work / "mid-8e", 8), "qwen3-fine": (work / "fine-64e", 64)}
    if not (sources["mixtral-mid"][0] / "config.json").exists():
        random_mixtral(sources["mixtral-mid"][0], SHIPPED, dtype=torch.bfloat16, std=0.02, **MID)
    if not (sources["qwen3-fine"][0] / "config.json").exists():
        sharded_random_moe("qwen3_moe", sources["qwen3-fine"][0], SHIPPED, layers=FINE_LAYERS, **FINE)
    models = {}
    for name, (src, n) in sources.items():
        m = {"source": src, "num_experts": n, "compression_cost": {}}
        for export in ("remap", "vanilla"):
            out = work / f"{name}-submoe-{n // 2}e-{export}"
            if not (out / "config.json").exists():
                compress(CompressOptions(model=str(src), out=out, method="submoe", num_experts=n // 2,
                                         calib=CALIB, samples=32, seq_len=128, export=export, force=True))
            report = json.loads((out / "compression_report.json").read_text())  # also when reused
            m["compression_cost"][export] = {"seconds": report["time_seconds"], "peak_rss_bytes": report["peak_rss_bytes"]}
            m[export] = out
        models[name] = m
    return models


def interleaved(model: dict, work: Path, rounds: int) -> dict:
    """Original, remap and vanilla up at once, measured in `rounds` rotating rounds."""
    opts = LoadTestOptions(
        targets=[str(model["source"]), str(model["remap"]), str(model["vanilla"])], labels=list(LABELS), data=EVAL,
        out=work, concurrency=CONCURRENCY, waves=1, min_requests=8, max_tokens=32, prompt_length=64,
        prompt_tokens=True, quality_prompts=4, serve_args=["--max-model-len", str(MAX_MODEL_LEN)], rounds=rounds,
        force=True)  # --work is the benchmark's own scratch space
    return run(opts)


def ratios_table(result: dict) -> list[dict]:
    """Per concurrency, each ratio's median and range over the interleaved rounds: compressed
    (remap) / original and remap / vanilla (the cost of the remap itself)."""
    rounds = {d["label"]: d["rounds"] for d in result["deployments"]}
    versus_original = round_ratios(rounds["submoe (remap)"], rounds["original"])
    remap_vanilla = round_ratios(rounds["submoe (remap)"], rounds["vanilla"])
    return [{"concurrency": a["concurrency"], "compressed_over_original": a, "remap_over_vanilla": b}
            for a, b in zip(versus_original, remap_vanilla)]


def equal_budget(model: dict, work: Path, headroom: float, rounds: int) -> dict:
    """Same bytes for weights + KV cache (the original gets `headroom` x its weights in KV), both
    deployments up at once and measured in interleaved rounds: long prompts at concurrency 16."""
    labels = LABELS[:2]
    weights = dict(zip(labels, (safetensors_bytes(model["source"]), safetensors_bytes(model["remap"]))))
    budget = int(weights["original"] * (1 + headroom))
    kv = {label: budget - weights[label] for label in labels}
    shape = dict(prompt_tokens=512, output_tokens=32, concurrency=16, requests=16)
    opts = LoadTestOptions(
        targets=[str(model["source"]), str(model["remap"])], labels=list(labels), data=EVAL, out=work,
        concurrency=[shape["concurrency"]], requests=shape["requests"], max_tokens=shape["output_tokens"],
        prompt_length=shape["prompt_tokens"], prompt_tokens=True, quality_prompts=1,
        serve_args=["--max-model-len", str(MAX_MODEL_LEN)],
        target_serve_args=[["--kv-cache-memory-bytes", str(kv[label])] for label in labels], rounds=rounds, force=True)
    result = run(opts)
    deployments = []
    for d in result["deployments"]:
        e = d["engine"]
        tokens = e["kv_cache_blocks"] * e["block_size"]
        deployments.append({"label": d["label"], "weight_bytes": weights[d["label"]], "kv_cache_bytes": kv[d["label"]],
                            "kv_cache_blocks": e["kv_cache_blocks"], "kv_cache_tokens": tokens,
                            "sequences_that_fit": tokens // (shape["prompt_tokens"] + shape["output_tokens"]),
                            "preemptions": e["preemptions_during_run"], "load": d["closed_loop"][0],
                            "rounds": d["rounds"], "memory": d["memory"]})
    return {"budget_bytes": budget, **shape, "rounds": rounds, "deployments": deployments,
            "ratios": result["interleaved"][0]["ratios"][0]}


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


def plot(result: dict, path: Path) -> None:
    """Per model, each round's compressed/original ratio (points) and the median (line): output
    tokens/s and decode speed (1 / ITL p50); then the equal-budget KV cache."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["models"])
    fig, axes = plt.subplots(1, 2 * len(names) + 1, figsize=(5 * (2 * len(names) + 1), 4.2))
    for k, name in enumerate(names):
        rows = result["models"][name]["ratios"]
        for ax, key, title in ((axes[2 * k], "output_tokens_per_s", "output tok/s"),
                               (axes[2 * k + 1], "itl_p50_s", "decode speed (1 / ITL p50)")):
            for pair, colour in (("compressed_over_original", "tab:orange"), ("remap_over_vanilla", "tab:green")):
                xs = [r["concurrency"] for r in rows]
                for x, r in zip(xs, rows):
                    ax.scatter([x] * len(r[pair][key]["per_round"]), r[pair][key]["per_round"], color=colour, s=12,
                               alpha=0.6)
                ax.plot(xs, [r[pair][key]["median"] for r in rows], marker="o", color=colour,
                        label=pair.replace("_over_", " / ").replace("compressed", "remap"))
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (closed loop)")
            ax.set_title(f"{name}: {title}, ratio per round", fontsize=10)
            ax.grid(alpha=0.3)
        axes[2 * k].legend(fontsize=8)
    ax, width = axes[-1], 0.38
    for k, label in enumerate(LABELS[:2]):
        ds = [next(d for d in result["models"][n]["equal_budget"]["deployments"] if d["label"] == label) for n in names]
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ax.bar(xs, [d["kv_cache_tokens"] / 1e3 for d in ds], width, label=label)
        for x, d in zip(xs, ds):
            ax.text(x, d["kv_cache_tokens"] / 1e3, f"{d['load']['output_tokens_per_s']:.0f} tok/s\n"
                    f"{d['preemptions']:.0f} preempt.", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_title("equal memory budget: KV cache (k tokens)", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    sk = result["soak"]
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    m = result["machine"]
    lines = ["# Serving benchmark", "", f"_{stamp(m)} Device: {m['device']}. One run._", ""]
    for name, m in result["models"].items():
        by = {d["label"]: d for d in m["measured"]["deployments"]}
        lines += [f"## {name}: {m['shape']}", "",
                  "| deployment | experts/layer | weight bytes | server memory idle (PSS) |", "|---|---|---|---|"]
        for d in m["measured"]["deployments"]:
            lines.append(f"| {d['label']} | {d['compression']['experts_per_layer'][0]} | "
                         f"{mb(d['compression']['weight_bytes'])} | {mb(d['memory']['idle_pss_bytes'])} |")
        o, r = by["original"]["compression"]["weight_bytes"], by["submoe (remap)"]["compression"]["weight_bytes"]
        lines += ["", f"Compressed / original weight bytes: **{r / o:.3f}**. {result['rounds']} interleaved rounds; "
                  "each cell: median [min, max] over the rounds (rounds above 1).", "",
                  "| concurrency | tok/s remap/original | decode speed remap/original | TTFT remap/original | "
                  "tok/s remap/vanilla |", "|---|---|---|---|---|"]
        for row in m["ratios"]:
            a, b = row["compressed_over_original"], row["remap_over_vanilla"]
            lines.append(f"| {row['concurrency']} | {spread_cell(a['output_tokens_per_s'])} | "
                         f"{spread_cell(a['itl_p50_s'])} | {spread_cell(a['ttft_p50_s'])} | "
                         f"{spread_cell(b['output_tokens_per_s'])} |")
        lines.append("")
    for name, m in result["models"].items():
        eb = m["equal_budget"]
        lines += [f"## {name}: equal memory budget", "",
                  f"Budget {mb(eb['budget_bytes'])} for weights + KV cache (the original's KV cache is "
                  f"{result['headroom'] * 100:.0f}% of its weights); {eb['requests']} requests of {eb['prompt_tokens']} "
                  f"prompt + {eb['output_tokens']} output tokens at concurrency {eb['concurrency']}, both up at once, "
                  f"{eb['rounds']} interleaved rounds (figures pooled over the rounds).", "",
                  "| deployment | weights | KV cache | KV blocks | sequences that fit | preemptions | tok/s | TTFT p50 | "
                  "E2E p99 |", "|---|---|---|---|---|---|---|---|---|"]
        for d in eb["deployments"]:
            ld = d["load"]
            lines.append(f"| {d['label']} | {mb(d['weight_bytes'])} | {mb(d['kv_cache_bytes'])} | "
                         f"{d['kv_cache_blocks']} | {d['sequences_that_fit']} | {d['preemptions']:.0f} | "
                         f"{ld['output_tokens_per_s']:.1f} | {ld['ttft_s']['p50']:.2f} s | {ld['e2e_s']['p99']:.2f} s |")
        r = eb["ratios"]
        lines += ["", f"Remap / original within each round: tok/s {spread_cell(r['output_tokens_per_s'])}, "
                  f"TTFT {spread_cell(r['ttft_p50_s'])}, E2E {spread_cell(r['e2e_p50_s'])} (median [min, max] "
                  f"(rounds above 1); latencies as original/remap).", ""]
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


SHAPES = {"mixtral-mid": f"Mixtral layout, hidden {MID['hidden']}, intermediate {MID['intermediate']}, {MID['layers']} "
                         f"layers, {MID['experts']} experts top-{MID['top_k']}, bf16; Sub-MoE 8->4",
          "qwen3-fine": f"Qwen3-MoE layout, hidden {FINE['hidden_size']}, expert intermediate "
                        f"{FINE['moe_intermediate_size']}, {FINE_LAYERS} layers, {FINE['num_experts']} experts "
                        f"top-{FINE['num_experts_per_tok']}, bf16; Sub-MoE 64->32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "serving-bench")
    ap.add_argument("--resume", action="store_true", help="reuse the finished phases found in --work")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per model (default 5)")
    ap.add_argument("--models", default=",".join(SHAPES), help=f"models to measure, of {list(SHAPES)}")
    ap.add_argument("--soak-requests", type=int, default=1000)
    ap.add_argument("--budget-rounds", type=int, default=3, help="interleaved rounds of the equal-budget run")
    ap.add_argument("--headroom", type=float, default=0.03,
                    help="equal budget: the original's KV cache as a fraction of its weight bytes (default 0.03)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = build_models(args.work)
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": {**machine(), "device": device},
              "rounds": args.rounds, "concurrency": CONCURRENCY, "headroom": args.headroom, "models": {},
              "reused_phases": []}

    def phase(name: str, measure_it):
        """Each phase's result is kept in --work; --resume reuses the ones a killed run finished."""
        saved = args.work / f"{name}.json"
        if args.resume and saved.exists():
            result["reused_phases"].append(name)  # measured by an earlier run: not in this run's wall time
        else:
            saved.write_text(json.dumps(measure_it()))
        return json.loads(saved.read_text())

    for name in args.models.split(","):
        m = models[name]
        measured = phase(f"interleaved-{name}", lambda: interleaved(m, args.work / name, args.rounds))
        budget = phase(f"equal-budget-{name}", lambda: equal_budget(m, args.work / f"{name}-budget", args.headroom,
                                                                     args.budget_rounds))
        result["models"][name] = {"shape": SHAPES[name], "compression_cost": m["compression_cost"],
                                  "measured": measured, "ratios": ratios_table(measured), "equal_budget": budget}
    result["soak"] = phase("soak", lambda: soak_and_cross_check(args.work, args.soak_requests))
    result["wall_seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(result))
    plot(result, args.out / "serving.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
