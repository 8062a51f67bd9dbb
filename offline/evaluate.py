"""`submoe eval`: per-domain perplexity, KL(reference ‖ model) and top-1 agreement.

The torch reference forward of a merged checkpoint is transformers' model of the source
architecture with N router experts whose expert i holds merged expert expert_map[i]: the
source's own routing over the N logits, then each chosen router expert computes with its
merged expert, which is exactly the remapped forward. A dropped router expert (format 2) has its
logit set to -inf inside the router, before the routing, as the plugin does. A corrected layer
(format 4) adds Σ_k w_k correction[i_k] to the MoE block's output, the routing recomputed from the
router's logits; its constant experts compute with zero weights (an exact zero output).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from submoe_format.checkpoint import (
    BLOCK_KEY,
    correction_tensor,
    dropped_experts,
    layout_for,
    merged_count,
    parse_block,
    served_expert_maps,
)
from submoe_format.texts import domain_name, read_texts

from .calibration.windows import check_token_ids, token_windows
from .moe_math import Experts
from .source.architecture import SourceArchitecture, layer_prefix
from .source.checkpoint import LazyCheckpoint, resolve_model_dir


def load_reference(model_dir: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """transformers' model of the checkpoint's architecture computing exactly what it serves (remap included)."""
    ckpt = LazyCheckpoint(model_dir)
    config = ckpt.config
    maps = served_expert_maps(config)
    n_router = len(next(m for m in maps if m is not None))
    arch = SourceArchitecture.of({**config, layout_for(config).num_experts_key(config): n_router})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch.config)
    block = parse_block(config) if BLOCK_KEY in config else None
    constants = [block.constants(l) if block else () for l in range(len(maps))]
    state = {n: ckpt.get(n) for n in ckpt.names() if not n.startswith(("model.layers.", "submoe."))}
    names = ckpt.names()
    routings = {}
    for l, m in enumerate(maps):
        expanded = None
        if m is not None:
            merged = arch.read_experts(ckpt, l, merged_count(m))
            idx = torch.tensor([e or 0 for e in m])  # a dropped expert is never routed to: any slot will do
            expanded = Experts(*(m[idx] for m in merged.matrices().values()))
            for mat in expanded.matrices().values():
                mat[list(constants[l])] = 0  # a constant expert's own output: exactly zero
        tensors = {n: ckpt.get(n) for n in arch.non_expert_names(names, l)}
        if m is not None:
            routings[l] = arch.layer_routing(l, tensors)
        for k, v in arch.hf_layer_state(l, tensors, expanded).items():
            state[layer_prefix(l) + k] = v
    if arch.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    if arch.config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = arch.rotary_embedding()  # its buffers are not in the checkpoint
    for l, m in enumerate(maps):
        corrected = block is not None and block.is_corrected(l)
        if dropped_experts(m, constants[l]) or corrected:
            mlp = model.model.layers[l].mlp
            logits = route_through(getattr(mlp, arch.layout.router_name), dropped_experts(m, constants[l]))
            if corrected:
                add_correction(mlp, logits, routings[l], ckpt.get(correction_tensor(l)).to(dtype))
    return model.eval()


def route_through(router: torch.nn.Module, dropped: list[int]) -> dict[str, torch.Tensor]:
    """Make a transformers router module compute the dropped experts' logits as -inf, before its
    softmax and top-k, and keep its last logits (the returned dict's "logits"). Every supported
    family's router computes its logits with one `F.linear(hidden, weight)` inside its forward: that
    call is wrapped while the forward runs."""
    mask = torch.zeros(router.weight.shape[0], dtype=torch.bool)
    mask[dropped] = True
    forward, last = router.forward, {}

    def masked_forward(*args, **kwargs):
        linear = F.linear

        def masked_linear(x, weight, bias=None):
            last["logits"] = linear(x, weight, bias).masked_fill(mask.to(x.device), float("-inf"))
            return last["logits"]
        F.linear = masked_linear
        try:
            return forward(*args, **kwargs)
        finally:
            F.linear = linear
    router.forward = masked_forward
    return last


def add_correction(mlp: torch.nn.Module, logits: dict[str, torch.Tensor], routing, correction: torch.Tensor) -> None:
    """After the MoE block's forward, add Σ_k w_k correction[i_k] under the source routing of its
    router's logits (the block returns its output, or (output, router logits)). The vectors are the
    block's `submoe_correction` (end-to-end distillation trains them: offline/distillation.py)."""
    def hook(module, args, out):
        hidden, c = out[0] if isinstance(out, tuple) else out, module.submoe_correction
        w, ids = routing(logits["logits"].reshape(-1, c.shape[0]))
        term = (w.unsqueeze(-1).to(c.dtype) * c.to(hidden.device)[ids]).sum(1)
        hidden = hidden + term.view_as(hidden).to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
    mlp.register_buffer("submoe_correction", correction, persistent=False)
    mlp.register_forward_hook(hook)


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([model(input_ids=w).logits.float().log_softmax(-1) for w in windows.split(batch)])


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[P, new_tokens] greedy continuations of equal-length prompts [P, L] (EOS does not stop them)."""
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[:, prompts.shape[1]:]


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[P] index of the first differing token of each row pair (the row length when identical)."""
    differ = a != b
    return torch.where(differ.any(1), differ.float().argmax(1), torch.full((len(a),), a.shape[1]))


def compare(logp: torch.Tensor, windows: torch.Tensor, ref_logp: torch.Tensor | None) -> dict:
    """Figures for one domain from [S, L, V] log-probabilities of model (and reference)."""
    tgt = windows[:, 1:]
    nll = -logp[:, :-1].gather(-1, tgt.unsqueeze(-1)).mean().item()
    out = {"tokens": tgt.numel(), "perplexity": math.exp(nll)}
    if ref_logp is not None:
        ref_nll = -ref_logp[:, :-1].gather(-1, tgt.unsqueeze(-1)).mean().item()
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        out.update(reference_perplexity=math.exp(ref_nll), kl=kl.mean().item(),
                   top1_agreement=(ref_logp.argmax(-1) == logp.argmax(-1)).float().mean().item(),
                   perplexity_retention=math.exp(ref_nll) / math.exp(nll))
    return out


def evaluate(model_dir: str, data: list[str], reference: str | None = None, seq_len: int = 256,
             max_windows: int = 32, progress: bool = True) -> dict:
    model = load_reference(model_dir)  # first: it checks the files (config, shards) with one clear error each
    ref = load_reference(reference) if reference else None
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(model_dir)))
    domains = {}
    for spec in tqdm(data, desc="eval", unit="domain", disable=not progress):
        windows = check_token_ids(token_windows(tokenizer, read_texts(spec), seq_len, max_windows),
                                  model.config.vocab_size, model_dir)
        logp = next_token_logprobs(model, windows)
        ref_logp = next_token_logprobs(ref, windows) if ref is not None else None
        domains[domain_name(spec)] = compare(logp, windows, ref_logp)
    keys = [k for k in ("perplexity", "kl", "top1_agreement", "perplexity_retention") if k in next(iter(domains.values()))]
    mean = {k: sum(d[k] for d in domains.values()) / len(domains) for k in keys}
    return {"model": str(model_dir), "reference": reference, "seq_len": seq_len, "domains": domains, "mean": mean}


def to_table(result: dict) -> str:
    has_ref = result["reference"] is not None
    head = "| domain | perplexity |" + (" reference ppl | KL | top-1 agreement |" if has_ref else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, d in {**result["domains"], "mean": result["mean"]}.items():
        row = f"| {name} | {d['perplexity']:.2f} |"
        if has_ref:
            ref = f"{d['reference_perplexity']:.2f}" if "reference_perplexity" in d else ""
            row += f" {ref} | {d['kl']:.4f} | {d['top1_agreement']:.3f} |"
        rows.append(row)
    return "\n".join(rows)
