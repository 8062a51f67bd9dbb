"""Quality through `vllm serve`: KL(original ‖ compressed) from the server's full next-token
distributions against the same figure from the torch reference forward, on the same windows.

    make served-quality        # python benchmarks/served_quality.py

The quality benchmark scores every checkpoint by the reference forward (offline/evaluate.py). This
checks that what a user serves is that model: each configuration is compressed on the shipped
model with `submoe compress` as a user types it, served by `vllm serve` (float32, the plugin), and
asked for every prompt token's full distribution (`prompt_logprobs` over the whole vocabulary);
the original's distributions come from the reference forward of the source. Per configuration:
mean KL through the server and through the reference forward, and the largest difference between
their log-probabilities. Writes benchmarks/results/served_quality.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import openai
import torch
from harness import CALIB, EVAL, MODELS, RESULTS, machine, write_results
from transformers import AutoTokenizer

from offline.calibration.windows import token_windows
from offline.evaluate import load_reference, next_token_logprobs
from serving.launcher import VLLMServer
from submoe_format.texts import domain_name, read_texts

# label -> `submoe compress` arguments beyond model, out and expert count
CONFIGS = {
    "mone": ["--method", "mone"],
    "output-lsq+refine+correct@16k": ["--method", "output-lsq", "--output-tokens", "16384", "--refine-steps", "100",
                                      "--correct"],
}


def served_logprobs(client: openai.OpenAI, model: str, window: list[int], vocab: int) -> torch.Tensor:
    """[L-1, V] the server's log-probabilities of every vocabulary token after each prefix of `window`."""
    r = client.completions.create(model=model, prompt=window, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": vocab})
    rows = r.choices[0].prompt_logprobs[1:]
    out = torch.full((len(rows), vocab), float("-inf"), dtype=torch.float64)
    for i, entry in enumerate(rows):
        ids = torch.tensor([int(t) for t in entry])
        out[i, ids] = torch.tensor([v["logprob"] for v in entry.values()], dtype=torch.float64)
    return out


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over positions of KL(p ‖ q) from log-probabilities [P, V]."""
    p_log, q_log = p_log.double(), q_log.double()
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


def measure(model_dir: Path, n: int, windows: dict[str, torch.Tensor], tmp: Path) -> dict:
    original = load_reference(str(model_dir))
    ref_logp = {d: next_token_logprobs(original, w)[:, :-1] for d, w in windows.items()}
    vocab = original.config.vocab_size
    rows = []
    for label, args in CONFIGS.items():
        out = tmp / label
        subprocess.run([sys.executable, "-m", "submoe", "compress", "--model", str(model_dir), "--out", str(out),
                        "--num-experts", str(n), "--calib", *CALIB, "--no-progress", *args], check=True)
        reference = load_reference(str(out))
        with VLLMServer(str(out), "--dtype", "float32", "--max-logprobs", str(vocab), "--max-model-len", "512",
                        "--enforce-eager") as server:
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="-")
            model = client.models.list().data[0].id
            domains = {}
            for d, w in windows.items():
                served = torch.stack([served_logprobs(client, model, row.tolist(), vocab) for row in w])
                ours = next_token_logprobs(reference, w)[:, :-1].double()
                domains[d] = {"kl_served": kl(ref_logp[d].reshape(-1, vocab), served.reshape(-1, vocab)),
                              "kl_reference": kl(ref_logp[d].reshape(-1, vocab), ours.reshape(-1, vocab)),
                              "max_abs_logprob_diff": (served - ours).abs().max().item()}
        rows.append({"label": label, "command": ["submoe", "compress", "--num-experts", str(n), *args],
                     "num_experts": n, "domains": domains,
                     **{k: statistics.fmean(v[k] for v in domains.values()) for k in ("kl_served", "kl_reference")},
                     "max_abs_logprob_diff": max(v["max_abs_logprob_diff"] for v in domains.values())})
        print(f"{label}: KL served {rows[-1]['kl_served']:.5f}, reference {rows[-1]['kl_reference']:.5f}, "
              f"max |Δ logprob| {rows[-1]['max_abs_logprob_diff']:.2e}", flush=True)
    return {"model": str(model_dir), "source_experts": original.config.num_local_experts, "rows": rows}


def to_markdown(results: dict) -> str:
    s = results["settings"]
    lines = ["# Quality through vllm serve", "",
             f"{s['windows_per_domain']} held-out window(s) of {s['seq_len']} tokens per domain "
             f"({len(results['rows'][0]['domains'])} domains), full next-token distributions from `vllm serve` "
             f"(float32) and from the reference forward; the original's from the reference forward of the source.",
             "", "| configuration | experts | mean KL through vllm serve | mean KL, reference forward | "
                 "max abs logprob difference |", "|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        lines.append(f"| {r['label']} | {results['source_experts']}→{r['num_experts']} | {r['kl_served']:.5f} | "
                     f"{r['kl_reference']:.5f} | {r['max_abs_logprob_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--windows", type=int, default=1, help="held-out windows per domain")
    args = ap.parse_args(argv)
    model_dir = MODELS["upcycled"]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows = {domain_name(p): token_windows(tok, read_texts(p), args.seq_len, args.windows) for p in EVAL}
    with tempfile.TemporaryDirectory(prefix="submoe-served-") as td:
        results = {"settings": {"seq_len": args.seq_len, "windows_per_domain": args.windows},
                   **measure(model_dir, 4, windows, Path(td))}
    write_results(args.out, "served_quality", results, to_markdown(results), machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
