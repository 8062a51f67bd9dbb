"""Write models/<name>/README.md from the figures.json the training script leaves beside the weights.

    python scripts/model_card.py models/tiny-mixtral-8e
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def card(model_dir: Path) -> str:
    f = json.loads((model_dir / "figures.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    t = f["train"]
    tokens = t["batch"] * t["seq_len"]
    upcycled = f["kind"] == "upcycled"
    dense_steps = t["dense_steps"] if upcycled else 0
    role = ("the default model of `make demo`, the tests and the benchmarks" if upcycled else
            "the quality benchmark's second stand-in: its experts start from independent random weights, as "
            "DeepSeek-MoE's and OLMoE's do, so their neurons are not aligned")
    lines = [
        f"# {model_dir.name}",
        "",
        f"A Mixtral-architecture MoE trained by this project on 2 CPU cores, {role}. "
        f"{f['parameters'] / 1e6:.1f}M parameters, stored in bfloat16.",
        "",
        f"- architecture: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} "
        f"heads ({cfg['num_key_value_heads']} KV heads, head dim {cfg['head_dim']}), {cfg['num_local_experts']} "
        f"experts top-{cfg['num_experts_per_tok']}, expert intermediate {cfg['intermediate_size']}, vocab "
        f"{cfg['vocab_size']} (byte-level BPE trained on the same corpus)",
        (f"- made as Mixtral and Qwen1.5-MoE were made ({f['kind']}): " if upcycled else f"- made {f['kind']}: ")
        + (f"a dense SwiGLU model trained {t['dense_steps']} steps, its feed-forward block copied into all "
           f"{cfg['num_local_experts']} experts with noise of 1% of each weight's std, then {t['moe_steps']} MoE steps "
           f"with transformers' load-balancing loss (coefficient {t['aux_loss_coef']})" if upcycled
           else f"{t['moe_steps']} MoE steps from a random start with transformers' load-balancing loss "
                f"(coefficient {t['aux_loss_coef']})")
        + (f"; then {t['balance_steps']} steps with a per-layer load-balancing loss (coefficient "
           f"{t['balance_coef']}, learning rate 3e-4): transformers' loss concatenates all layers' router "
           f"logits, so it balances expert indices across layers, not each layer" if t.get("balance_steps") else ""),
        f"- {tokens} tokens a step (batch {t['batch']} x {t['seq_len']}), AdamW, cosine schedule, seed {t['seed']}, "
        f"{t['threads']} threads: {(dense_steps + t['moe_steps'] + t.get('balance_steps', 0)) * tokens / 1e6:.1f}M "
        f"tokens in {f['train_seconds'] / 60:.0f} minutes on this machine (shared with other work while it ran; "
        f"about an hour on an idle 2-core machine)",
        "- corpus (`scripts/build_corpus.py`, Debian packages): Python standard-library source, Python docs "
        "(python3-doc), fortunes in German, Spanish, Italian, Russian, Polish and Czech; domains sampled with "
        "probability proportional to the square root of their size",
        "",
        "Rebuild (corpus, tokenizer, both models; deterministic): `make model`.",
        "",
        "## Held-out perplexity per domain (`data/eval/`)",
        "",
        "| domain | perplexity | unigram perplexity |",
        "|---|---:|---:|",
    ]
    for dom, d in f["eval"].items():
        lines.append(f"| {dom} | {d['perplexity']:.1f} | {d['unigram_perplexity']:.1f} |")
    n_layers = len(f["calibration_mix_expert_load"])
    lines += ["", "## Expert load on the calibration mix (share of top-2 selections; balanced = 0.125)", "",
              "| layer | " + " | ".join(f"e{i}" for i in range(cfg["num_local_experts"])) + " | min |",
              "|---" * (cfg["num_local_experts"] + 2) + "|"]
    for l, row in enumerate(f["calibration_mix_expert_load"]):
        lines.append(f"| {l} | " + " | ".join(f"{x:.3f}" for x in row) + f" | {min(row):.3f} |")
    dead = [(l, e) for l, row in enumerate(f["calibration_mix_expert_load"]) for e, x in enumerate(row) if x < 0.005]
    if dead:
        lines += ["", "Never (or almost never) routed: " + ", ".join(f"layer {l} expert {e}" for l, e in dead)
                  + ". A dead expert, as MoEs trained from scratch can have; the per-layer balancing loss did not "
                    "revive it. Kept as is: it is a real case every compression method must handle (frequency 0)."]
    lines += ["", "## Routing frequency per domain (experts specialise)", "",
              "Share of each domain's top-2 selections per expert; a domain that leaves the uniform 0.125 is "
              "served by its own experts.", ""]
    for l in range(n_layers):
        lines += [f"Layer {l}:", "", "| domain | " + " | ".join(f"e{i}" for i in range(cfg["num_local_experts"])) + " |",
                  "|---" * (cfg["num_local_experts"] + 1) + "|"]
        for dom, d in f["eval"].items():
            lines.append(f"| {dom} | " + " | ".join(f"{x:.3f}" for x in d["routing_frequency"][l]) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    d = Path(sys.argv[1])
    (d / "README.md").write_text(card(d))
    print(f"wrote {d / 'README.md'}")
