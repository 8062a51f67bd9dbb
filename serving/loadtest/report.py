"""The load test's outputs: JSON (everything), a markdown report, plots and a terminal table."""
from __future__ import annotations

import json
from pathlib import Path


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e3:.1f}"


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**20:.0f} MiB"


def ratios(result: dict) -> list[dict]:
    """Each other deployment against the first, per concurrency: throughput (higher is better
    above 1) and p50 latencies (lower is better below 1)."""
    base, *others = result["deployments"]
    rows = []
    for other in others:
        for a, b in zip(base["closed_loop"], other["closed_loop"]):
            row = {"label": other["label"], "versus": base["label"], "concurrency": a["concurrency"]}
            row["output_tokens_per_s"] = b["output_tokens_per_s"] / a["output_tokens_per_s"] if a["output_tokens_per_s"] else None
            for key in ("ttft_s", "itl_s", "e2e_s"):
                x, y = a[key]["p50"], b[key]["p50"]
                row[f"{key[:-2]}_p50"] = y / x if x and y is not None else None
            rows.append(row)
    return rows


def spread_cell(s: dict | None) -> str:
    """'1.05 [0.98, 1.12] (4/5)': a ratio's median over interleaved rounds, its range, rounds above 1."""
    return "–" if s is None else f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] ({s['above_1']}/{s['rounds']})"


def summary_table(result: dict) -> str:
    """One line per deployment and concurrency: what a reader compares first."""
    head = f"{'deployment':<14} {'conc':>5} {'tok/s':>8} {'req/s':>7} {'TTFT p50/p99 ms':>17} " \
           f"{'ITL p50/p99 ms':>16} {'E2E p50 ms':>11} {'errors':>6}"
    lines = [head, "-" * len(head)]
    for d in result["deployments"]:
        for s in d["closed_loop"] + ([d["open_loop"]] if d.get("open_loop") else []):
            conc = str(s["concurrency"]) if "concurrency" in s else f"{s['rate']:g}/s"
            lines.append(f"{d['label']:<14} {conc:>5} {s['output_tokens_per_s']:>8.1f} {s['requests_per_s']:>7.2f} "
                         f"{_ms(s['ttft_s']['p50']) + '/' + _ms(s['ttft_s']['p99']):>17} "
                         f"{_ms(s['itl_s']['p50']) + '/' + _ms(s['itl_s']['p99']):>16} {_ms(s['e2e_s']['p50']):>11} "
                         f"{s['errors']:>6}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    cfg = result["config"]
    out = [f"# Load test: {' vs '.join(d['label'] for d in result['deployments'])}", "",
           f"{cfg['prompts']} seeded held-out prompts ({cfg['prompt_length']} {cfg['prompt_unit']}), "
           f"{cfg['max_tokens']} output tokens each (ignore_eos, greedy); closed loop at concurrency "
           f"{', '.join(map(str, cfg['concurrency']))}"
           + (f", open loop at {cfg['rate']:g} requests/s (Poisson)" if cfg.get("rate") else "") + ".", "",
           "## Deployments", "",
           "| | experts per layer | weight bytes | server memory (PSS, idle / peak) | quality |",
           "|---|---|---|---|---|"]
    for d in result["deployments"]:
        g, q, m = d.get("compression") or {}, d.get("quality") or {}, d.get("memory") or {}
        experts = ",".join(map(str, sorted(set(g.get("experts_per_layer", []))))) or "–"
        quality = f"ppl {q['perplexity']:.2f}" if q.get("perplexity") else "–"
        if q.get("top1_agreement") is not None:
            quality += f", top-1 agreement {q['top1_agreement']:.3f} with {result['deployments'][0]['label']}"
        out.append(f"| {d['label']} | {experts} | {_mb(g.get('weight_bytes'))} | "
                   f"{_mb(m.get('idle_pss_bytes'))} / {_mb(m.get('peak_pss_bytes'))} | {quality} |")
    out += ["", "## Latency and throughput", "", "```", summary_table(result), "```", ""]
    rows = ratios(result)
    if rows:
        out += ["## Ratios (each deployment / the first)", "",
                "| deployment | concurrency | output tok/s | TTFT p50 | ITL p50 | E2E p50 |", "|---|---|---|---|---|---|"]
        fmt = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        out += [f"| {r['label']} | {r['concurrency']} | {fmt(r['output_tokens_per_s'])} | {fmt(r['ttft_p50'])} | "
                f"{fmt(r['itl_p50'])} | {fmt(r['e2e_p50'])} |" for r in rows]
        out.append("")
    for v in result.get("interleaved", []):
        out += [f"## {v['label']} / {v['versus']}, ratio within each of {result['config']['rounds']} interleaved rounds",
                "", "Median [min, max] over the rounds (rounds in which it is above 1); above 1 is better for "
                f"{v['label']}: output tok/s as a/b, latencies as b/a.", "",
                "| concurrency | output tok/s | decode speed (1 / ITL p50) | TTFT p50 | E2E p50 |", "|---|---|---|---|---|"]
        out += [f"| {r['concurrency']} | " + " | ".join(spread_cell(r[k]) for k in
                                                    ("output_tokens_per_s", "itl_p50_s", "ttft_p50_s", "e2e_p50_s")) + " |"
                for r in v["ratios"]]
        out.append("")
    for d in result["deployments"]:
        if d.get("soak"):
            s = d["soak"]
            out += [f"## Soak ({d['label']})", "",
                    f"{s['requests']} requests at concurrency {s['concurrency']}: {s['errors']} failed; "
                    f"resident memory (PSS) growth after warm-up {s['memory_growth'] * 100:+.2f}% "
                    f"({_mb(s['memory_after_warmup'])} → peak {_mb(s['memory_peak'])}).", ""]
    out.append("![latency and throughput](loadtest.png)")
    return "\n".join(out) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib  # here, not at import: `submoe compress` imports this module's CLI
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = [("output_tokens_per_s", None, "output tokens/s"), ("ttft_s", "p50", "TTFT p50 (ms)"),
              ("itl_s", "p50", "inter-token latency p50 (ms)"), ("e2e_s", "p99", "end-to-end p99 (ms)")]
    for ax, (key, pct, title) in zip(axes, panels):
        for d in result["deployments"]:
            xs = [s["concurrency"] for s in d["closed_loop"]]
            ys = [s[key] if pct is None else (s[key][pct] or float("nan")) * 1e3 for s in d["closed_loop"]]
            ax.plot(xs, ys, marker="o", label=d["label"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def output_paths(out_dir: Path) -> dict[str, Path]:
    return {"json": out_dir / "loadtest.json", "markdown": out_dir / "loadtest.md", "plot": out_dir / "loadtest.png"}


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    """loadtest.json, loadtest.md and loadtest.png in `out_dir` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "ratios": ratios(result)}
    paths = output_paths(out_dir)
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    return paths
