"""`make demo`: compress the shipped tiny MoE 8->4 with the recommended setting (`submoe compress`
without --method) and, for comparison, with Sub-MoE (the paper this project started from); serve
the three models with `vllm serve`, talk to them with the openai client, print one side-by-side table
(size, per-domain perplexity, KL and top-1 agreement against the original).

    python scripts/demo.py [--out demo-out] [--num-experts 4]

It drives the compressor (`offline`) and the load tester's server tools (`serving`) from above
both, so it lives with the repository's scripts, not in either package.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offline.compress import compress
from offline.evaluate import evaluate
from offline.options import CompressOptions
from offline.presets import DEFAULT, PRESETS
from serving.client import client_for, served_model
from serving.launcher import VLLMServer
from serving.scrape import compression_gauges
from submoe_format.texts import read_texts

SHIPPED = ROOT / "models" / "tiny-mixtral-8e"


def serve_and_ask(model: Path, prompt: str, log: Path) -> dict:
    """Start `vllm serve MODEL`, send a completion and a chat request, and read expert counts and
    weight bytes from the server's own /metrics. (Speed is `make serving`'s job: a 12M-parameter
    model's per-request timings on a shared CPU are noise; that benchmark interleaves rounds.)"""
    t0 = time.time()
    with VLLMServer(str(model), log_path=log) as server:
        startup = time.time() - t0
        client = client_for(server.base_url)
        name = served_model(client)
        completion = client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
        chat = client.chat.completions.create(model=name, max_tokens=24, temperature=0,
                                              messages=[{"role": "user", "content": "Wie geht es dir?"}])
        gauges = compression_gauges(server.base_url)
    return {
        "experts_per_layer": gauges["experts_per_layer"],
        "weight_bytes": gauges["weight_bytes"],
        "startup_seconds": startup,
        "completion": completion.choices[0].text,
        "chat": chat.choices[0].message.content,
    }


def side_by_side(served: dict[str, dict], quality: dict[str, dict]) -> str:
    """One column per deployment: the original, then each compression with its quality against it."""
    labels = list(served)
    experts = lambda r: ",".join(map(str, sorted(set(r["experts_per_layer"]))))  # noqa: E731
    rows = [("experts per layer", *[experts(served[k]) for k in labels]),
            ("weight bytes", *[f"{served[k]['weight_bytes'] / 1e6:.2f} MB" for k in labels])]
    domains = next(iter(quality.values()))["domains"]
    for dom in domains:
        rows.append((f"perplexity {dom}", f"{domains[dom]['reference_perplexity']:.2f}",
                     *[f"{quality[k]['domains'][dom]['perplexity']:.2f}" for k in labels[1:]]))
    rows.append(("mean KL / top-1 agreement", "0 / 1.000",
                 *[f"{quality[k]['mean']['kl']:.4f} / {quality[k]['mean']['top1_agreement']:.3f}" for k in labels[1:]]))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':{w}}" + "".join(f"  {k:>22}" for k in labels)]
    lines += [f"{r[0]:{w}}" + "".join(f"  {str(c):>22}" for c in r[1:]) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out")
    ap.add_argument("--num-experts", type=int, default=4)
    args = ap.parse_args()
    calib = sorted(str(p) for p in (ROOT / "data" / "calib").glob("*.jsonl"))
    evals = sorted(str(p) for p in (ROOT / "data" / "eval").glob("*.jsonl"))
    args.out.mkdir(parents=True, exist_ok=True)
    recommended = PRESETS[DEFAULT]
    runs = {f"recommended ({recommended.settings['method']})": dict(recommended.settings), "Sub-MoE": {"method": "submoe"}}
    dirs, reports, quality = {}, {}, {}
    for i, (label, settings) in enumerate(runs.items(), start=1):
        dst = dirs[label] = args.out / f"tiny-mixtral-{settings['method']}-{args.num_experts}e"
        print(f"[{i}/5] submoe compress {args.model.name} 8->{args.num_experts}, {label} -> {dst}", flush=True)
        reports[label] = compress(CompressOptions(model=str(args.model), out=dst, num_experts=args.num_experts,
                                                  calib=calib, force=True, **settings))
        print(f"      {reports[label]['time_seconds']:.1f} s; report: {dst}/compression_report.md", flush=True)
        quality[label] = evaluate(str(dst), evals, reference=str(args.model), progress=False)

    prompt = read_texts(evals[0])[0][:200]
    served = {}
    for i, (label, model) in enumerate([("original", args.model), *dirs.items()], start=3):
        print(f"[{i}/5] vllm serve {model} ... a completion and a chat request", flush=True)
        r = serve_and_ask(model, prompt, args.out / f"serve-{label.split()[0]}.log")
        print(f"      completion: {r['completion'][:70]!r}\n      chat: {r['chat'][:70]!r}", flush=True)
        served[label] = r

    print()
    print(side_by_side(served, quality))
    (args.out / "demo.json").write_text(json.dumps({"serving": served, "quality": quality,
                                                    "compression": {k: r["sizes"] for k, r in reports.items()}},
                                                   indent=2) + "\n")
    print(f"\nwrote {args.out / 'demo.json'}")


if __name__ == "__main__":
    main()
