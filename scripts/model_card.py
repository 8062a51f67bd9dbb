"""Write models/<name>/README.md from the figures.json the training script leaves beside the weights.

    python scripts/model_card.py models/tiny-mixtral-8e
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def perplexity_table(f: dict) -> list[str]:
    """Held-out perplexity per domain against the unigram model's, from figures.json."""
    return ["## Held-out perplexity per domain (`data/eval/`)", "", "| domain | perplexity | unigram perplexity |",
            "|---|---:|---:|", *(f"| {dom} | {d['perplexity']:.1f} | {d['unigram_perplexity']:.1f} |"
                                for dom, d in f["eval"].items())]


def card(model_dir: Path) -> str:
    f = json.loads((model_dir / "figures.json").read_text())
    if f["kind"] == "fine-grained":
        return fine_grained_card(model_dir, f)
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
        *perplexity_table(f),
    ]
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


def fine_grained_card(model_dir: Path, f: dict) -> str:
    """The card of the fine-grained stand-in: 64 experts are too many for one column each, so the load
    table has a row per expert, and per-domain routing is summarised by how concentrated it is."""
    cfg = json.loads((model_dir / "config.json").read_text())
    t = f["train"]
    n, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    tokens = t["batch"] * t["seq_len"]
    steps = t["moe_steps"] + t.get("balance_steps", 0)
    load = f["calibration_mix_expert_load"]
    lines = [
        f"# {model_dir.name}",
        "",
        f"A fine-grained Qwen2-MoE-architecture MoE trained by this project on 2 CPU cores, from scratch (as OLMoE, "
        f"DeepSeek-MoE and Qwen3-MoE were): the quality benchmark's third stand-in. {n} small routed experts, "
        f"top-{k}, plus one shared expert behind its sigmoid gate (Qwen1.5-MoE's design). "
        f"{f['parameters'] / 1e6:.1f}M parameters, stored in bfloat16.",
        "",
        f"- architecture: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} "
        f"heads ({cfg['num_key_value_heads']} KV heads, head dim {cfg['hidden_size'] // cfg['num_attention_heads']}), "
        f"{n} routed experts of intermediate {cfg['moe_intermediate_size']}, top-{k} (not renormalised), a shared "
        f"expert of intermediate {cfg['shared_expert_intermediate_size']}; the active expert width per token "
        f"({k} x {cfg['moe_intermediate_size']} + {cfg['shared_expert_intermediate_size']} = "
        f"{k * cfg['moe_intermediate_size'] + cfg['shared_expert_intermediate_size']}) and the routed experts' total "
        f"({n} x {cfg['moe_intermediate_size']} = {n * cfg['moe_intermediate_size']}) match the 8-expert models' "
        f"(2 x 384 and 8 x 384); vocab {cfg['vocab_size']}, the same tokenizer",
        f"- made from scratch: {t['moe_steps']} steps with a per-layer load-balancing loss (coefficient "
        f"{t.get('moe_balance_coef')}), then {t.get('balance_steps', 0)} steps with it at {t['balance_coef']} and "
        f"learning rate 3e-4; transformers' own loss is off (it concatenates all layers' router logits)",
        f"- {tokens} tokens a step (batch {t['batch']} x {t['seq_len']}), AdamW, cosine schedule, seed {t['seed']}, "
        f"{t['threads']} threads: {steps * tokens / 1e6:.1f}M tokens in {f['train_seconds'] / 60:.0f} minutes on this "
        f"machine (shared with other work while it ran). Routed experts are computed densely in training (the same "
        f"function and gradients, faster on a CPU for many small experts)",
        "- corpus: the same as the 8-expert models' (`scripts/build_corpus.py`)",
        "",
        "Rebuild: `make model` (deterministic).",
        "",
        *perplexity_table(f),
    ]
    lines += ["", f"## Expert load on the calibration mix (share of top-{k} selections; balanced = {1 / n:.4f})", "",
              "| layer | min | median | max | experts below a quarter of balanced |", "|---:|---:|---:|---:|---:|"]
    for l, row in enumerate(load):
        srt = sorted(row)
        lines.append(f"| {l} | {srt[0]:.4f} | {srt[len(srt) // 2]:.4f} | {srt[-1]:.4f} | "
                     f"{sum(x < 0.25 / n for x in row)} |")
    lines += ["", "Per expert:", "", "| expert | " + " | ".join(f"layer {l}" for l in range(len(load))) + " |",
              "|---:" * (len(load) + 1) + "|"]
    for e in range(n):
        lines.append(f"| {e} | " + " | ".join(f"{row[e]:.4f}" for row in load) + " |")
    lines += ["", "## Routing per domain (experts specialise)", "",
              f"Share of each domain's top-{k} selections taken by its {k} most used experts (uniform routing: "
              f"{k / n:.3f}), and those experts.", ""]
    for l in range(len(load)):
        lines += [f"Layer {l}:", "", "| domain | top-8 share | its top-8 experts |", "|---|---:|---|"]
        for dom, d in f["eval"].items():
            row = d["routing_frequency"][l]
            top = sorted(range(n), key=lambda e: -row[e])[:k]
            lines.append(f"| {dom} | {sum(row[e] for e in top):.3f} | {', '.join(map(str, sorted(top)))} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    d = Path(sys.argv[1])
    (d / "README.md").write_text(card(d))
    print(f"wrote {d / 'README.md'}")
