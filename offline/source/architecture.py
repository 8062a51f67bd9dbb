"""Source decoder layers built from checkpoint tensors with transformers' own modules.

The offline side needs the source model's exact forward, one layer at a time, for every
supported MoE architecture: `SourceArchitecture` finds that architecture's transformers
classes (decoder layer, rotary embedding, config) and translates between the on-disk names
(per-expert gate/up/down tensors) and transformers' fused expert parameters.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from transformers import AutoConfig, PreTrainedConfig

from submoe_format.checkpoint import BLOCK_KEY, layout_for
from submoe_format.families import Family

from ..moe_math import Experts, ExpertStack, Routing, weighted_expert_sum


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def hf_config(config: dict) -> PreTrainedConfig:
    """transformers' own config class for the checkpoint's model_type (the `submoe` block dropped)."""
    fields = {k: v for k, v in config.items() if k not in (BLOCK_KEY, "model_type")}
    cfg = AutoConfig.for_model(config["model_type"], **fields)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm"
    return cfg


def routing_of(layout: Family, cfg: PreTrainedConfig) -> Routing:
    """The source's routing: softmax over N logits, top-k, then what the family's routing rule adds
    (submoe_format.families): Mixtral always renormalises the k weights; Qwen-MoE and OLMoE follow
    `norm_topk_prob`; DeepSeek-V2 may limit the choice to the best `topk_group` of `n_group` expert
    groups and scales by `routed_scaling_factor` (renormalising when `norm_topk_prob`, as vLLM does)."""
    return Routing(**layout.routing_settings(lambda field: getattr(cfg, field, None)))


@dataclass
class SourceArchitecture:
    """One checkpoint's architecture: its MoE layout, transformers config, routing and modules."""

    layout: Family
    config: PreTrainedConfig
    routing: Routing

    @classmethod
    def of(cls, config: dict) -> "SourceArchitecture":
        layout = layout_for(config)
        cfg = hf_config(config)
        return cls(layout, cfg, routing_of(layout, cfg))

    def _modeling(self, suffix: str):
        return getattr(importlib.import_module(self.layout.transformers_module), self.layout.transformers_class(suffix))

    @property
    def num_experts(self) -> int:
        return getattr(self.config, self.layout.num_experts_field)

    def moe_layers(self) -> list[bool]:
        return self.layout.moe_layers(self.config.to_dict())

    def layer_routing(self, layer: int, tensors: dict[str, torch.Tensor]) -> Routing:
        """The routing of one MoE layer: the architecture's, with the layer's score-correction bias
        (DeepSeek-V3) from its tensors."""
        bias = self.layout.router_bias_tensor(layer)
        return self.routing.for_layer(tensors[bias] if bias else None)

    def read_experts(self, ckpt, layer: int, num_experts: int, device: torch.device | str = "cpu") -> Experts:
        """A layer's experts as stored: on the CPU, views into the memory-mapped files (nothing is read
        until an expert is used, and the layer is never copied whole, whatever its size); on another
        device, each expert copied there."""
        mats = {w: [ckpt.get(self.layout.expert_tensor(layer, e, w)).to(device) for e in range(num_experts)]
                for w in ("gate", "up", "down")}
        return Experts(*(ExpertStack(m) for m in mats.values()))

    def expert_tensors(self, layer: int, experts: Experts) -> dict[str, torch.Tensor]:
        """On-disk names for a layer's (merged) experts."""
        return {self.layout.expert_tensor(layer, e, which): t[e]
                for e in range(len(experts)) for which, t in experts.matrices().items()}

    def non_expert_names(self, names: list[str], layer: int) -> list[str]:
        """The layer's attention, norms, router, shared experts and dense MLP: everything kept as is."""
        p = layer_prefix(layer)
        return [n for n in names if n.startswith(p) and not self.layout.is_expert_tensor(n)]

    def hf_layer_state(self, layer: int, tensors: dict[str, torch.Tensor],
                       experts: Experts | None) -> dict[str, torch.Tensor]:
        """transformers' parameter names (relative to the layer) for on-disk layer tensors + experts."""
        p, moe = layer_prefix(layer), f"{self.layout.moe_prefix}."
        state = {}
        for name, t in tensors.items():
            local = name[len(p):]
            state["mlp." + local[len(moe):] if local.startswith(moe) else local] = t
        if experts is not None:
            state["mlp.experts.gate_up_proj"] = experts.fused_gate_up()
            state["mlp.experts.down_proj"] = experts.down
        return state

    def build_layer(self, layer: int, tensors: dict[str, torch.Tensor], experts: Experts | None,
                    dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """transformers' decoder layer holding the given tensors in `dtype`, and `experts` as they are
        (any dtype: `StreamedExperts` upcasts one expert at a time, never the whole stack)."""
        cfg = self.config
        if experts is not None and len(experts) != self.num_experts:
            fields = cfg.to_dict()
            cfg = hf_config({**fields, self.layout.num_experts_key(fields): len(experts)})
        with torch.device("meta"):  # no random init to allocate and overwrite: the tensors are adopted as they are
            module = self._modeling("DecoderLayer")(cfg, layer)
        if experts is not None:
            module.mlp.experts = StreamedExperts(experts)
        state = self.hf_layer_state(layer, tensors, None)
        module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
        return module.eval()

    def rotary_embedding(self) -> torch.nn.Module:
        return self._modeling("RotaryEmbedding")(self.config)

    def rotary(self, seq_len: int, device: torch.device | str = "cpu") -> "Rotary":
        return Rotary(self.rotary_embedding(), self.config.hidden_size, seq_len, device)


class StreamedExperts(torch.nn.Module):
    """Stands in for transformers' experts module (every family calls it as experts(x, top-k ids,
    top-k weights)) over experts held as stored: each expert runs on its routed tokens, upcast to
    float32 on its own, so a bf16 layer never exists as a float32 copy."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.held = experts  # not parameters: nothing to load, nothing copied by .to()

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros(len(x), len(self.held), dtype=torch.float32, device=x.device)
        weights.scatter_add_(1, top_k_index, top_k_weights.float())
        return weighted_expert_sum(x, weights, self.held).to(x.dtype)


class Rotary:
    """Position embeddings for [S, L] windows, computed once and shared by all layers (cos/sin, or
    DeepSeek's complex frequencies: whatever the architecture's attention takes)."""

    def __init__(self, rope: torch.nn.Module, hidden: int, seq_len: int, device: torch.device | str = "cpu"):
        pos = torch.arange(seq_len).unsqueeze(0)
        emb = rope(torch.zeros(1, seq_len, hidden), pos)
        self.embeddings = tuple(e.to(device) for e in emb) if isinstance(emb, tuple) else emb.to(device)


@torch.no_grad()
def attention_half(layer: torch.nn.Module, x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """x + attention(norm(x)) for [S, L, H] windows (causal)."""
    h, *_ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=None,
                            position_embeddings=rotary.embeddings)
    return x + h
