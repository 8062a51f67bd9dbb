"""Train the shipped tiny Mixtral-architecture MoE, deterministically, on 2 CPU cores.

Upcycled as Mixtral and Qwen1.5-MoE were made: a dense SwiGLU model is trained first, its
feed-forward block is copied into every expert (plus tiny noise), then the MoE trains on with
Mixtral's load-balancing loss. `--from-scratch` skips the dense phase (experts from
independent random starts, like DeepSeek-MoE / OLMoE): the second stand-in model.
`--family qwen2_moe` trains the fine-grained stand-in from scratch: Qwen1.5/2-MoE's layout with
many small routed experts, top-k of them per token, and one shared expert with its sigmoid gate.

    python scripts/train_tiny_moe.py --corpus build/corpus --tokenizer build/tokenizer \
        --data data --out models/tiny-mixtral-8e
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.models.qwen2_moe import modeling_qwen2_moe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from offline.calibration.windows import token_windows
from submoe_format.texts import read_texts

ARCH = dict(vocab_size=4096, hidden_size=256, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=1024,
            rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
            bos_token_id=1, eos_token_id=2, pad_token_id=3)
NUM_EXPERTS, TOP_K = 8, 2


def dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' routed-experts forward computed densely: every expert on every token, each
    weighted by its routing weight (0 outside the token's top-k). The same function and gradients;
    for many small experts on a CPU a few large matrix products beat a loop over experts (measured
    2-4x faster for 64 experts of 48)."""
    num, inter = self.num_experts, self.intermediate_dim
    w = torch.zeros(hidden_states.shape[0], num, dtype=hidden_states.dtype)
    w = w.scatter_add(1, top_k_index, top_k_weights.to(hidden_states.dtype))
    gate_up = hidden_states @ self.gate_up_proj.reshape(num, 2, inter, -1).permute(3, 0, 1, 2).reshape(self.hidden_dim, -1)
    gate_up = gate_up.view(-1, num, 2, inter)
    h = self.act_fn(gate_up[:, :, 0]) * gate_up[:, :, 1] * w[:, :, None]
    return h.reshape(-1, num * inter) @ self.down_proj.permute(0, 2, 1).reshape(num * inter, -1)


def domain_tokens(corpus: Path, tokenizer) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted((corpus / "train").glob("*.jsonl")):
        ids: list[int] = []
        for text in read_texts(str(path)):
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
        out[path.stem] = torch.tensor(ids, dtype=torch.int32)
    return out


class MixtureSampler:
    """Random windows, domain drawn with probability ∝ sqrt(size): small domains are seen
    more than their share, without being repeated many times over."""

    def __init__(self, domains: dict[str, torch.Tensor], seq_len: int, seed: int):
        self.names = list(domains)
        self.data = [domains[n] for n in self.names]
        sizes = torch.tensor([len(d) for d in self.data], dtype=torch.float64)
        self.probs = sizes.sqrt() / sizes.sqrt().sum()
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        which = torch.multinomial(self.probs, batch_size, replacement=True, generator=self.gen)
        rows = []
        for d in which.tolist():
            data = self.data[d]
            start = torch.randint(0, len(data) - self.seq_len - 1, (1,), generator=self.gen).item()
            rows.append(data[start: start + self.seq_len + 1])
        return torch.stack(rows).long()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss N·Σ f_i P_i computed per layer, then averaged.

    transformers' `load_balancing_loss_func` concatenates all layers' logits first, so it only
    balances expert *indices* across layers: expert 6 may starve in layer 0 while expert 6 of
    another layer makes up for it. This one balances every layer on its own (balanced = top_k)."""
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        losses.append(probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train(model, sampler, steps: int, peak_lr: float, batch: int, tag: str, log, balance_coef: float = 0.0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0, tokens = time.time(), 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr, warmup=min(100, steps // 10 + 1))
        x = sampler.batch(batch)
        out = model(input_ids=x[:, :-1], labels=x[:, 1:].contiguous(), shift_labels=x[:, 1:].contiguous())
        loss = out.loss
        if balance_coef:
            out.aux_loss = per_layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
            loss = loss + balance_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x[:, :-1].numel()
        if step % 50 == 0 or step == steps - 1:
            aux = getattr(out, "aux_loss", None)
            log(f"[{tag}] step {step}/{steps} loss {out.loss.item():.3f}"
                + (f" aux {aux.item():.3f}" if aux is not None else "")
                + f" {tokens / (time.time() - t0):.0f} tok/s {time.time() - t0:.0f}s")


def upcycle(dense: MistralForCausalLM, moe_config: MixtralConfig, noise: float, seed: int) -> MixtralForCausalLM:
    """Copy the dense model into an MoE: every expert starts as the dense MLP (+ tiny noise)."""
    torch.manual_seed(seed)
    moe = MixtralForCausalLM(moe_config)
    dense_sd = dense.state_dict()
    moe_sd = moe.state_dict()
    for name, t in dense_sd.items():
        if ".mlp." not in name:
            moe_sd[name].copy_(t)
    for l in range(moe_config.num_hidden_layers):
        p = f"model.layers.{l}.mlp."
        gate_up = torch.cat([dense_sd[p + "gate_proj.weight"], dense_sd[p + "up_proj.weight"]], 0)
        down = dense_sd[p + "down_proj.weight"]
        for name, w in ((p + "experts.gate_up_proj", gate_up), (p + "experts.down_proj", down)):
            target = moe_sd[name]
            target.copy_(w.expand_as(target) + noise * w.std() * torch.randn_like(target))
    moe.load_state_dict(moe_sd)
    return moe


@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], unigram_logp: torch.Tensor) -> dict:
    """Per-domain held-out perplexity, unigram perplexity and per-layer routing frequencies."""
    model.eval()
    result = {}
    for dom, w in windows.items():
        nll, n, counts = 0.0, 0, None
        for chunk in w.split(8):
            out = model(input_ids=chunk, output_router_logits=True)
            logp = out.logits[:, :-1].float().log_softmax(-1)
            tgt = chunk[:, 1:]
            nll -= logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
            n += tgt.numel()
            k = model.config.num_experts_per_tok
            layer_counts = torch.stack([torch.bincount(r.topk(k, -1).indices.flatten(), minlength=r.shape[-1])
                                        for r in out.router_logits])
            counts = layer_counts if counts is None else counts + layer_counts
        uni = -unigram_logp[w[:, 1:]].sum().item() / w[:, 1:].numel()
        result[dom] = {"perplexity": math.exp(nll / n), "unigram_perplexity": math.exp(uni), "tokens": n,
                       "routing_frequency": (counts / counts.sum(-1, keepdim=True)).tolist()}
    return result


def unigram_log_probs(domains: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    counts = sum(torch.bincount(d.long(), minlength=vocab).double() for d in domains.values()) + 1.0
    return (counts / counts.sum()).log()


def export(model: MixtralForCausalLM, out: Path) -> dict[str, torch.Tensor]:
    """State dict in the canonical on-disk Mixtral naming (per-expert w1/w2/w3), bf16."""
    sd, tensors = model.state_dict(), {}
    I = model.config.intermediate_size
    for name, t in sd.items():
        if ".mlp.experts." in name:
            continue
        tensors[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    for l in range(model.config.num_hidden_layers):
        p = f"model.layers.{l}."
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        for e in range(model.config.num_local_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors[q + "w1.weight"] = gate_up[e, :I]
            tensors[q + "w3.weight"] = gate_up[e, I:]
            tensors[q + "w2.weight"] = down[e]
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in sorted(tensors.items())}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"))
    ap.add_argument("--tokenizer", type=Path, default=Path("build/tokenizer"))
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--out", type=Path, default=Path("models/tiny-mixtral-8e"))
    ap.add_argument("--dense-steps", type=int, default=900)
    ap.add_argument("--moe-steps", type=int, default=1300)
    ap.add_argument("--from-scratch", action="store_true", help="no dense phase: random independent experts")
    ap.add_argument("--aux-loss-coef", type=float, default=0.03)
    ap.add_argument("--resume", type=Path, help="start from this exported MoE instead of training from zero")
    ap.add_argument("--balance-steps", type=int, default=0,
                    help="then train on with a per-layer load-balancing loss for this many steps")
    ap.add_argument("--balance-coef", type=float, default=0.1)
    ap.add_argument("--moe-balance-coef", type=float, default=0.0,
                    help="a per-layer load-balancing loss already in the main MoE phase (with --aux-loss-coef 0)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--family", choices=("mixtral", "qwen2_moe"), default="mixtral")
    ap.add_argument("--experts", type=int, default=NUM_EXPERTS)
    ap.add_argument("--top-k", type=int, default=TOP_K)
    ap.add_argument("--expert-intermediate", type=int, default=ARCH["intermediate_size"])
    ap.add_argument("--shared-intermediate", type=int, default=384, help="qwen2_moe: the shared expert's size")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    logfile = (args.out.parent / f"{args.out.name}.train.log")
    logfile.parent.mkdir(parents=True, exist_ok=True)
    logf = logfile.open("w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    domains = domain_tokens(args.corpus, tok)
    sampler = MixtureSampler(domains, args.seq_len, args.seed)
    log("train tokens per domain: " + ", ".join(f"{n}={len(d)}" for n, d in domains.items()))
    log("sampling probability: " + ", ".join(f"{n}={p:.3f}" for n, p in zip(sampler.names, sampler.probs.tolist())))

    if args.family == "qwen2_moe":  # fine-grained, from scratch only, as OLMoE / DeepSeek / Qwen3 were
        modeling_qwen2_moe.Qwen2MoeExperts.forward = dense_experts_forward
        arch = {k: v for k, v in ARCH.items() if k not in ("head_dim", "sliding_window")}
        moe_config = Qwen2MoeConfig(**arch, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                    moe_intermediate_size=args.expert_intermediate, norm_topk_prob=False,
                                    shared_expert_intermediate_size=args.shared_intermediate,
                                    router_aux_loss_coef=args.aux_loss_coef, output_router_logits=True)
    else:
        moe_config = MixtralConfig(**ARCH, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                                   router_aux_loss_coef=args.aux_loss_coef, output_router_logits=True,
                                   experts_implementation="grouped_mm")
    earlier = None
    if args.family == "qwen2_moe":
        model = Qwen2MoeForCausalLM(moe_config)
    elif args.resume:
        from offline.evaluate import load_reference
        model = load_reference(str(args.resume))
        model.config.output_router_logits = True
        earlier = json.loads((args.resume / "figures.json").read_text())
        log(f"resumed from {args.resume}")
    elif args.from_scratch:
        model = MixtralForCausalLM(moe_config)
    else:
        dense = MistralForCausalLM(MistralConfig(**ARCH))
        train(dense, sampler, args.dense_steps, 2e-3, args.batch, "dense", log)
        model = upcycle(dense, moe_config, noise=0.01, seed=args.seed)
        del dense
    if not args.resume:
        from_scratch = args.from_scratch or args.family != "mixtral"
        train(model, sampler, args.moe_steps, 2e-3 if from_scratch else 1e-3, args.batch, "moe", log,
              balance_coef=args.moe_balance_coef)
    if args.balance_steps:
        model.router_aux_loss_coef = 0.0  # replaced by the per-layer loss below
        balance_sampler = MixtureSampler(domains, args.seq_len, args.seed + 1)
        train(model, balance_sampler, args.balance_steps, 3e-4, args.batch, "balance", log,
              balance_coef=args.balance_coef)
    train_seconds = time.time() - t_start + (earlier["train_seconds"] if earlier else 0)

    eval_windows = {p.stem: token_windows(tok, read_texts(str(p)), args.seq_len)
                    for p in sorted((args.data / "eval").glob("*.jsonl"))}
    calib_windows = torch.cat([token_windows(tok, read_texts(str(p)), args.seq_len)
                               for p in sorted((args.data / "calib").glob("*.jsonl"))])
    figures = evaluate(model, eval_windows, unigram_log_probs(domains, ARCH["vocab_size"]))
    calib_load = evaluate(model, {"calib": calib_windows}, unigram_log_probs(domains, ARCH["vocab_size"]))["calib"]

    if args.family == "mixtral":
        export(model, args.out)
    else:  # transformers writes the hub's per-expert naming
        model.to(torch.bfloat16).save_pretrained(args.out)
        (args.out / "generation_config.json").unlink(missing_ok=True)
    config = moe_config.to_dict()
    for k in ("output_router_logits", "_experts_implementation", "experts_implementation"):
        config.pop(k, None)
    config.update(architectures=[type(model).__name__], torch_dtype="bfloat16", dtype="bfloat16")
    (args.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (args.out / f).write_bytes((args.tokenizer / f).read_bytes())
    train_args = {k: getattr(args, k) for k in ("dense_steps", "moe_steps", "batch", "seq_len", "seed", "aux_loss_coef",
                                                "threads", "balance_steps", "balance_coef", "moe_balance_coef")}
    if earlier:
        train_args.update({k: v for k, v in earlier["train"].items() if k not in ("balance_steps", "balance_coef")})
    summary = {
        "kind": earlier["kind"] if earlier else ("fine-grained" if args.family != "mixtral" else
                                                  "from-scratch" if args.from_scratch else "upcycled"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": train_args,
        "train_tokens_per_domain": {n: len(d) for n, d in domains.items()},
        "train_seconds": round(train_seconds),
        "eval": figures,
        "calibration_mix_expert_load": calib_load["routing_frequency"],
    }
    (args.out / "figures.json").write_text(json.dumps(summary, indent=2) + "\n")
    for dom, f in figures.items():
        log(f"{dom:7s} ppl {f['perplexity']:8.2f}  unigram {f['unigram_perplexity']:8.2f}")
    log("min expert load per layer on the calibration mix: "
        + ", ".join(f"{min(r):.3f}" for r in calib_load["routing_frequency"]))
    log(f"done in {train_seconds:.0f}s")


if __name__ == "__main__":
    main()
