"""The supported MoE families, one data entry each: everything the compressor, the checkpoint
format and the vLLM plugin need to know about an architecture lives in its `Family`.

    config fields     where the expert count, the expert width and top-k live
    tensor naming     where the router and the per-expert gate/down/up matrices are stored
    routing rule      how the source turns router logits into k (weight, expert) pairs
    MoE-layer rule    which decoder layers route experts (the others have a dense MLP)
    classes           the source (transformers and vLLM) class, the vLLM module building it,
                      and the plugin class served for a compressed checkpoint
    tiny              a tiny test configuration with every feature of the family switched on

Adding a family is adding one entry to `FAMILIES` (and checking that its rules are the
source's, tests/test_architectures.py). Nothing else compares `model_type`s.

Pure data: imports neither torch, nor vLLM, nor transformers, nor `offline`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class GroupedTopK:
    """Top-k limited to the best `topk_groups` of `num_groups` equal expert groups, used when the
    config's `method_field` equals `method` (always when `method` is None). A group scores its
    best expert, or, with a score-correction bias, its best two (DeepSeek-V3, as vLLM does)."""

    method_field: str = "topk_method"
    method: str | None = "group_limited_greedy"
    num_groups_field: str = "n_group"
    topk_groups_field: str = "topk_group"


@dataclass(frozen=True)
class RoutingRule:
    """Scores of the N router logits (softmax, or what the config field `scoring_field` names:
    DeepSeek-V3's sigmoid), plus the layer's score-correction bias (a router tensor named
    `bias_name`) when choosing experts only; top-k (maybe grouped); the k unbiased scores are the
    weights, renormalised (`renormalize`: always if True, never if False, or as the named boolean
    config field says), then scaled by the config field `scaling_field` (1 when None)."""

    renormalize: bool | str = True
    grouped: GroupedTopK | None = None
    scaling_field: str | None = None
    scoring_field: str | None = None
    bias_name: str | None = None  # under the router module, e.g. mlp.gate.e_score_correction_bias

    def settings(self, get) -> dict[str, Any]:
        """The routing's settings (Routing's fields but top_k and the per-layer bias) from `get(field)`,
        which reads a config (a transformers config's attribute, a config.json key; None when absent)."""
        renormalize = self.renormalize if isinstance(self.renormalize, bool) else bool(get(self.renormalize))
        grouped = self.grouped is not None and (self.grouped.method is None
                                                or get(self.grouped.method_field) == self.grouped.method)
        return dict(renormalize=renormalize,
                    num_groups=get(self.grouped.num_groups_field) if grouped else 1,
                    topk_groups=get(self.grouped.topk_groups_field) if grouped else 1,
                    scaling=float(get(self.scaling_field) or 1.0) if self.scaling_field else 1.0,  # absent: 1
                    scoring=(get(self.scoring_field) if self.scoring_field else None) or "softmax")


@dataclass(frozen=True)
class MoELayerRule:
    """Decoder layer l routes experts iff l >= config[first_dense_field] (its first layers are
    dense), l is not listed in config[dense_layers_field], and (l + period_offset) % config[period_field]
    == 0. A field that is None (or absent from the config) does not restrict: all layers by default."""

    first_dense_field: str | None = None
    dense_layers_field: str | None = None
    period_field: str | None = None
    period_offset: int = 0

    def __call__(self, config: Mapping[str, Any]) -> list[bool]:
        first = (config.get(self.first_dense_field) if self.first_dense_field else 0) or 0
        dense = set((config.get(self.dense_layers_field) if self.dense_layers_field else None) or [])
        period = (config.get(self.period_field) if self.period_field else 1) or 1
        return [l >= first and l not in dense and (l + self.period_offset) % period == 0
                for l in range(config["num_hidden_layers"])]


@dataclass(frozen=True)
class Family:
    """One supported MoE architecture: config fields, checkpoint tensor names, routing and MoE-layer
    rules, the classes that build it, and a tiny test configuration."""

    model_type: str
    source_architecture: str  # transformers' and vLLM's ...ForCausalLM class, config.json `architectures`
    plugin_architecture: str  # the vllm_submoe class serving a compressed checkpoint
    vllm_module: str  # vllm.model_executor.models.<vllm_module> defines source_architecture
    num_experts_field: str
    intermediate_field: str
    num_experts_alias: str | None = None  # the same count under another name (transformers 5 renamed some)
    top_k_field: str = "num_experts_per_tok"
    moe_prefix: str = "mlp"  # module under model.layers.{l}
    router_name: str = "gate"
    expert_names: tuple[str, str, str] = ("gate_proj", "down_proj", "up_proj")  # W_G, W_D, W_U
    routing: RoutingRule = RoutingRule()
    moe_layer_rule: MoELayerRule = MoELayerRule()
    description: str = field(default="", repr=False)
    # the tiny test configuration (offline.synthetic.random_moe): read it, never change it in place
    tiny: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)

    # -- classes --------------------------------------------------------------------------------

    @property
    def vllm_class(self) -> str:
        """The vLLM class the plugin class extends (vLLM names it as transformers does)."""
        return self.source_architecture

    @property
    def transformers_module(self) -> str:
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"

    def transformers_class(self, suffix: str) -> str:
        """transformers' class name for a part of the model: 'DecoderLayer', 'RotaryEmbedding', ..."""
        return self.source_architecture.removesuffix("ForCausalLM") + suffix

    # -- config fields ----------------------------------------------------------------------------

    def num_experts_keys(self, config: Mapping[str, Any]) -> list[str]:
        """Every key of config.json that holds the expert count (hub configs and transformers 5 name
        it differently): a config may carry both names, and transformers then reads one of them, so
        a writer sets each of them."""
        return [k for k in (self.num_experts_field, self.num_experts_alias) if k and k in config] or \
            [self.num_experts_field]

    def num_experts_key(self, config: Mapping[str, Any]) -> str:
        """The key a reader takes the count from: the family's own name where present."""
        return self.num_experts_keys(config)[0]

    def num_experts(self, config: Mapping[str, Any]) -> Any:
        return config.get(self.num_experts_key(config))

    def moe_layers(self, config: Mapping[str, Any]) -> list[bool]:
        """Which decoder layers have routed experts, decided as the source architecture decides."""
        return self.moe_layer_rule(config)

    def routing_settings(self, get) -> dict[str, Any]:
        """Keyword arguments of offline.moe_math.Routing, read from a config through `get(field)`."""
        return dict(top_k=get(self.top_k_field), **self.routing.settings(get))

    # -- tensor naming ------------------------------------------------------------------------------

    def router_tensor(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.moe_prefix}.{self.router_name}.weight"

    def router_bias_tensor(self, layer: int) -> str | None:
        """The layer's score-correction bias (None for families without one)."""
        bias = self.routing.bias_name
        return f"model.layers.{layer}.{self.moe_prefix}.{self.router_name}.{bias}" if bias else None

    def expert_tensor(self, layer: int, expert: int, which: str) -> str:
        """`which` is one of 'gate', 'down', 'up'."""
        name = dict(zip(("gate", "down", "up"), self.expert_names))[which]
        return f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}.{name}.weight"

    def is_expert_tensor(self, name: str) -> bool:
        return f".{self.moe_prefix}.experts." in name

    def expert_shapes(self, hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
        return {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}


# Qwen-MoE: every `decoder_sparse_step`-th layer ((l + 1) % step == 0) but the `mlp_only_layers`.
QWEN_SPARSE_LAYERS = MoELayerRule(dense_layers_field="mlp_only_layers", period_field="decoder_sparse_step",
                                  period_offset=1)
NORM_TOPK_PROB = RoutingRule(renormalize="norm_topk_prob")

MIXTRAL = Family(
    "mixtral", "MixtralForCausalLM", "SubMoEMixtralForCausalLM", "mixtral",
    num_experts_field="num_local_experts", intermediate_field="intermediate_size",
    moe_prefix="block_sparse_moe", expert_names=("w1", "w2", "w3"),
    routing=RoutingRule(renormalize=True),
    description="Mixtral (mistralai/Mixtral-8x7B and kin): softmax top-k, always renormalised.",
    tiny=dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=64, num_key_value_heads=1))

QWEN2_MOE = Family(
    "qwen2_moe", "Qwen2MoeForCausalLM", "SubMoEQwen2MoeForCausalLM", "qwen2_moe",
    num_experts_field="num_experts", num_experts_alias="num_local_experts", intermediate_field="moe_intermediate_size",
    routing=NORM_TOPK_PROB, moe_layer_rule=QWEN_SPARSE_LAYERS,
    description="Qwen1.5-MoE / Qwen2-MoE: the shared expert and its sigmoid gate are served as they are; "
                "top-k renormalised as `norm_topk_prob` says.",
    tiny=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=96,
              shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1],
              num_key_value_heads=1))

QWEN3_MOE = Family(
    "qwen3_moe", "Qwen3MoeForCausalLM", "SubMoEQwen3MoeForCausalLM", "qwen3_moe",
    num_experts_field="num_experts", num_experts_alias="num_local_experts", intermediate_field="moe_intermediate_size",
    routing=NORM_TOPK_PROB, moe_layer_rule=QWEN_SPARSE_LAYERS,
    description="Qwen3-MoE: top-k renormalised as `norm_topk_prob` says.",
    tiny=dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=96,
              norm_topk_prob=True, head_dim=32, num_key_value_heads=1))

OLMOE = Family(
    "olmoe", "OlmoeForCausalLM", "SubMoEOlmoeForCausalLM", "olmoe",
    num_experts_field="num_experts", num_experts_alias="num_local_experts", intermediate_field="intermediate_size",
    routing=NORM_TOPK_PROB,
    description="OLMoE: softmax top-k, renormalised as `norm_topk_prob` says (not by default).",
    tiny=dict(num_experts=8, num_experts_per_tok=2, intermediate_size=64, norm_topk_prob=False,
              num_key_value_heads=2))

DEEPSEEK_V2 = Family(
    "deepseek_v2", "DeepseekV2ForCausalLM", "SubMoEDeepseekV2ForCausalLM", "deepseek_v2",
    num_experts_field="n_routed_experts", intermediate_field="moe_intermediate_size",
    # renormalised when `norm_topk_prob`, as vLLM does
    routing=RoutingRule(renormalize="norm_topk_prob", grouped=GroupedTopK(), scaling_field="routed_scaling_factor"),
    moe_layer_rule=MoELayerRule(first_dense_field="first_k_dense_replace", period_field="moe_layer_freq"),
    description="DeepSeek-V2 / V2-Lite: shared experts, dense first layers, grouped top-k and the routed "
                "scaling factor, all as vLLM's DeepSeek-V2 does.",
    tiny=dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=96,
              # vLLM's CPU MLA kernel is compiled for DeepSeek's 512 + 64 latent only
              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
              qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, n_group=4, topk_group=2,
              topk_method="group_limited_greedy", routed_scaling_factor=2.0, norm_topk_prob=False,
              # with 2 heads, stock vLLM's CPU MLA already differs from transformers (0.04 logprob)
              num_attention_heads=4, num_key_value_heads=4))

DEEPSEEK_V3 = Family(
    "deepseek_v3", "DeepseekV3ForCausalLM", "SubMoEDeepseekV3ForCausalLM", "deepseek_v2",
    num_experts_field="n_routed_experts", num_experts_alias="num_local_experts", intermediate_field="moe_intermediate_size",
    routing=RoutingRule(renormalize="norm_topk_prob", grouped=GroupedTopK(method=None), scaling_field="routed_scaling_factor",
                        scoring_field="scoring_func", bias_name="e_score_correction_bias"),
    moe_layer_rule=MoELayerRule(first_dense_field="first_k_dense_replace"),
    description="DeepSeek-V3 / R1 / Kimi-K2 layout: sigmoid scores, a per-layer score-correction bias choosing the "
                "experts, top-2-sum group-limited top-k, the routed scaling factor, a shared expert and dense first "
                "layers, all as vLLM's DeepSeek-V3 does.",
    tiny=dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, intermediate_size=96,
              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=64,
              qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32, n_group=4, topk_group=2,
              topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
              num_attention_heads=4, num_key_value_heads=4))

FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3)
BY_MODEL_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES}
BY_PLUGIN: dict[str, Family] = {f.plugin_architecture: f for f in FAMILIES}
