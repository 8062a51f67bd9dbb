"""Mixtral decoder layers built from checkpoint tensors with transformers' own modules.

The offline side needs the source model's exact forward, one layer at a time: it uses
transformers' MixtralDecoderLayer / RMSNorm / rotary embedding and only translates the
on-disk names (per-expert w1/w2/w3) into transformers' fused expert parameters.
"""
from __future__ import annotations

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from vllm_submoe.checkpoint_format import MIXTRAL

from .moe_math import Experts


def hf_config(config: dict) -> MixtralConfig:
    cfg = MixtralConfig(**{k: v for k, v in config.items() if k != "submoe"})
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    return cfg


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def read_experts(ckpt, layer: int, num_experts: int) -> Experts:
    get = lambda e, which: ckpt.get(MIXTRAL.expert_tensor(layer, e, which))  # noqa: E731
    return Experts(gate=torch.stack([get(e, "gate") for e in range(num_experts)]),
                   up=torch.stack([get(e, "up") for e in range(num_experts)]),
                   down=torch.stack([get(e, "down") for e in range(num_experts)]))


def expert_tensors(layer: int, experts: Experts) -> dict[str, torch.Tensor]:
    """On-disk names for a layer's (merged) experts."""
    out = {}
    for e in range(len(experts)):
        for which, t in experts.matrices().items():
            out[MIXTRAL.expert_tensor(layer, e, which)] = t[e]
    return out


def non_expert_names(names: list[str], layer: int) -> list[str]:
    p = layer_prefix(layer)
    return [n for n in names if n.startswith(p) and ".experts." not in n]


def hf_layer_state(layer: int, tensors: dict[str, torch.Tensor], experts: Experts) -> dict[str, torch.Tensor]:
    """transformers' parameter names (relative to the layer) for on-disk layer tensors + experts."""
    p = layer_prefix(layer)
    state = {}
    for name, t in tensors.items():
        state[name[len(p):].replace(f"{MIXTRAL.moe_prefix}.{MIXTRAL.router_name}.", "mlp.gate.")] = t
    state["mlp.experts.gate_up_proj"] = torch.cat([experts.gate, experts.up], dim=1)
    state["mlp.experts.down_proj"] = experts.down
    return state


def build_layer(config: MixtralConfig, layer: int, tensors: dict[str, torch.Tensor], experts: Experts,
                dtype: torch.dtype = torch.float32) -> MixtralDecoderLayer:
    """A transformers decoder layer holding the given attention/norm/router tensors and experts."""
    cfg = hf_config({**config.to_dict(), "num_local_experts": len(experts)})
    module = MixtralDecoderLayer(cfg, layer)
    state = hf_layer_state(layer, tensors, experts)
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return module.to(dtype).eval()


class Rotary:
    """Position embeddings for [S, L] windows, computed once and shared by all layers."""

    def __init__(self, config: MixtralConfig, seq_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        rope = MixtralRotaryEmbedding(config)
        pos = torch.arange(seq_len).unsqueeze(0)
        cos, sin = rope(torch.zeros(1, seq_len, config.hidden_size, dtype=dtype), pos)
        self.cos, self.sin = cos.to(device), sin.to(device)


@torch.no_grad()
def attention_half(layer: MixtralDecoderLayer, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """x + attention(norm(x)) for [S, L, H] windows (causal)."""
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None,
                           position_embeddings=(rotary.cos, rotary.sin))
    return x + h
