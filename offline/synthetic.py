"""Random-weight Mixtral checkpoints for tests and speed benchmarks (no hub needed)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_submoe.checkpoint_format import MIXTRAL

from .checkpoint import copy_tokenizer


def random_mixtral(out: Path, tokenizer_dir: Path, hidden: int = 64, intermediate: int = 96, layers: int = 2,
                   experts: int = 8, top_k: int = 2, heads: int = 2, kv_heads: int = 1, vocab: int = 4096,
                   seed: int = 0, dtype: torch.dtype = torch.float32, std: float = 0.05) -> Path:
    """Write a random Mixtral in the canonical on-disk naming, with the given tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=gen) * std).to(dtype)  # noqa: E731
    head_dim = hidden // heads
    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
         "model.norm.weight": torch.ones(hidden, dtype=dtype)}
    for l in range(layers):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "self_attn.q_proj.weight"] = rnd(heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = rnd(kv_heads * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = rnd(hidden, heads * head_dim)
        t[MIXTRAL.router_tensor(l)] = rnd(experts, hidden) * 20
        for e in range(experts):
            for which, shape in MIXTRAL.expert_shapes(hidden, intermediate).items():
                t[MIXTRAL.expert_tensor(l, e, which)] = rnd(*shape)
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "num_local_experts": experts, "num_experts_per_tok": top_k, "max_position_embeddings": 1024,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
              "torch_dtype": str(dtype).removeprefix("torch."), "router_aux_loss_coef": 0.02}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(tokenizer_dir, out)
    return out
