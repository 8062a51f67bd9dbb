"""Random-weight Mixtral checkpoints for tests and speed benchmarks (no hub needed)."""
from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from submoe_format.checkpoint import layout_for
from submoe_format.families import FAMILIES, MIXTRAL

from .writing.shards import copy_tokenizer


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


# Tiny settings per architecture (each family's `tiny` entry): every feature the compressor and the
# plugin must get right is on (shared experts with their sigmoid gate, dense MLP layers, top-k
# renormalisation or not, grouped top-k with a routed scaling factor, q/k norms, MLA attention).
TINY = {family.model_type: family.tiny for family in FAMILIES}


def random_moe(model_type: str, out: Path, tokenizer_dir: Path, layers: int = 3, hidden: int = 64, heads: int = 2,
               seed: int = 0, std: float = 0.05, router_gain: float = 10.0, **overrides) -> Path:
    """A tiny random MoE of any supported architecture, built by transformers from its own config
    class and written by `save_pretrained` (the hub's on-disk naming), with the given tokenizer.
    Router rows are scaled by `router_gain` so routing is decisive, as in a trained model. (vLLM's CPU
    backend wants head_dim 32, 64, ... and a hidden size divisible by 32: the defaults fit.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = json.loads((tokenizer_dir / "config.json").read_text())
    fields = {**dict(vocab_size=tok["vocab_size"], hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, initializer_range=std, bos_token_id=tok.get("bos_token_id"),
                     eos_token_id=tok.get("eos_token_id"), pad_token_id=tok.get("pad_token_id")),
              **copy.deepcopy(dict(layout_for({"model_type": model_type}).tiny)), **overrides}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm gains start at 1; randomise them a little so a mixed-up norm shows
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # transformers names every router mlp.gate
                p.mul_(router_gain)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's starts at 0: make it choose experts
                b.copy_(0.3 * torch.randn_like(b))
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_dir, out)
    return out


def sharded_random_mixtral(out: Path, tokenizer_dir: Path, layers: int, hidden: int = 1024, intermediate: int = 3584,
                           experts: int = 8, heads: int = 8, kv_heads: int = 2, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16) -> Path:
    """A large random Mixtral written one decoder layer per shard (hub-style index), holding one
    layer in memory at a time: the scaling benchmark's sources (8 GB and more)."""
    from .writing.shards import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    small = random_mixtral(out / "layout", tokenizer_dir, hidden=hidden, intermediate=8, layers=1, experts=experts,
                           heads=heads, kv_heads=kv_heads, vocab=json.loads((tokenizer_dir / "config.json").read_text())
                           ["vocab_size"], dtype=dtype)
    config = json.loads((small / "config.json").read_text())
    config.update(intermediate_size=intermediate, num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).to(dtype)  # noqa: E731
    writer = ShardWriter(out)
    from safetensors import safe_open
    with safe_open(str(small / "model.safetensors"), framework="pt") as f:
        writer.write({k: f.get_tensor(k) for k in f.keys() if not k.startswith("model.layers.")})
        layer0 = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.0.") and ".experts." not in k}
    for l in range(layers):
        t = {k.replace("model.layers.0.", f"model.layers.{l}."): v for k, v in layer0.items()}
        t[MIXTRAL.router_tensor(l)] = rnd(experts, hidden) * 50
        for e in range(experts):
            for which, shape in MIXTRAL.expert_shapes(hidden, intermediate).items():
                t[MIXTRAL.expert_tensor(l, e, which)] = rnd(*shape)
        writer.write(t)
    writer.finish()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(tokenizer_dir, out)
    import shutil
    shutil.rmtree(small)
    return out


# Config fields that decide which tensors a checkpoint holds (not their sizes): a tiny model with
# these names every tensor of the full-size one.
_NAMING_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok", "mlp_only_layers",
                  "decoder_sparse_step", "first_k_dense_replace", "moe_layer_freq", "n_shared_experts", "q_lora_rank",
                  "n_group", "topk_group", "topk_method")


def sharded_random_moe(model_type: str, out: Path, tokenizer_dir: Path, layers: int, seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, router_gain: float = 50.0, **fields) -> Path:
    """A random MoE of any supported family at a real shape (Qwen3-30B-A3B's, DeepSeek-V3's: `fields`
    are its config fields), written a decoder layer at a time (2 GiB shards) and generated one tensor at a time,
    so a layer far larger than memory can be written: the scaling benchmark's sources. A tiny model
    with the same naming fields gives the tensor names as `save_pretrained` writes them; the
    full-size config, through transformers' own modules on the meta device, gives their shapes."""
    import shutil

    from offline.source.architecture import SourceArchitecture

    from .writing.shards import ShardWriter

    tiny = random_moe(model_type, out / "template", tokenizer_dir, layers=layers,
                      **{k: v for k, v in fields.items() if k in _NAMING_FIELDS})
    config = {**json.loads((tiny / "config.json").read_text()), **fields, "torch_dtype": str(dtype).removeprefix("torch.")}
    arch = SourceArchitecture.of(config)
    layout, hidden = arch.layout, config["hidden_size"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(shape, gain: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02 * gain).to(dtype)

    from safetensors import safe_open
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        small_hidden = json.loads((tiny / "config.json").read_text())["hidden_size"]
        outer = {n: [hidden if d == small_hidden else d for d in f.get_slice(n).get_shape()]
                 for n in names if not n.startswith("model.layers.")}
    writer = ShardWriter(out)
    writer.write({n: torch.ones(s, dtype=dtype) if "norm" in n else rnd(s) for n, s in outer.items()})
    for l, is_moe in enumerate(arch.moe_layers()):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in arch._modeling("DecoderLayer")(arch.config, l).state_dict().items()}
        on_disk = arch.hf_layer_state(l, {n: n for n in arch.non_expert_names(names, l)}, None)  # hf name -> disk name
        t = {disk: torch.ones(shapes[hf], dtype=dtype) if "norm" in hf else
             rnd(shapes[hf], router_gain if disk == layout.router_tensor(l) else 1.0) for hf, disk in on_disk.items()}
        experts = ((layout.expert_tensor(l, e, which), rnd(shape)) for e in range(arch.num_experts if is_moe else 0)
                   for which, shape in layout.expert_shapes(hidden, config[layout.intermediate_field]).items())
        writer.write(itertools.chain(t.items(), experts))  # generated as written: a layer may exceed memory
        del t
    writer.finish()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(tokenizer_dir, out)
    shutil.rmtree(tiny)
    return out
