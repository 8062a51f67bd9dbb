"""SubMoEMixtralForCausalLM: vLLM's Mixtral with merged experts behind a routing remap.

Same attention, norms, fused-MoE layer and weight loading as vLLM's own Mixtral; only the MoE
block differs: the router keeps its N rows, vLLM's fused MoE holds the layer's N' merged
experts, and `RemappedSoftmaxTopK` maps the chosen router experts to merged ones on the device.
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.mixtral import MixtralAttention, MixtralModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from ..checkpoint_format import MIXTRAL, SubMoEBlock, check_all_present, check_tensor_shape, \
    expected_expert_tensors, parse_block
from ..routing import RemappedSoftmaxTopK


def submoe_block_of(config) -> SubMoEBlock:
    """Validate the checkpoint's `submoe` block before any weight is allocated."""
    return parse_block(config.to_dict())


class SubMoEMixtralMoE(nn.Module):
    def __init__(self, config, expert_map: list[int], num_router_experts: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.gate = GateLinear(config.hidden_size, num_router_experts, prefix=f"{prefix}.gate")
        self.route = RemappedSoftmaxTopK(expert_map)
        self.experts = FusedMoEFactory(
            num_experts=max(expert_map) + 1,
            top_k=config.num_experts_per_tok,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            renormalize=True,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            custom_routing_function=self.route,
            ckpt_names=MIXTRAL.expert_names,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        orig_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, self.hidden_size)
        router_logits, _ = self.gate(hidden_states)
        return self.experts(hidden_states, router_logits).view(orig_shape)


class SubMoEMixtralDecoderLayer(nn.Module):
    def __init__(self, config, block: SubMoEBlock, layer_idx: int, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = ""):
        super().__init__()
        self.self_attn = MixtralAttention(
            config=config, hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
            max_position=config.max_position_embeddings, num_kv_heads=config.num_key_value_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.self_attn",
        )
        self.block_sparse_moe = SubMoEMixtralMoE(
            config, list(block.expert_maps[layer_idx]), block.num_router_experts,
            quant_config=quant_config, prefix=f"{prefix}.block_sparse_moe",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.block_sparse_moe(hidden_states), residual


@support_torch_compile
class SubMoEMixtralModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.submoe = submoe_block_of(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: SubMoEMixtralDecoderLayer(
                config, self.submoe, int(prefix.rsplit(".", 1)[-1]), vllm_config.cache_config,
                quant_config=vllm_config.quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class SubMoEMixtralForCausalLM(nn.Module, SupportsPP):
    fall_back_to_pt_during_load = False
    hf_to_vllm_mapper = MixtralModel.hf_to_vllm_mapper
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = SubMoEMixtralModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(self._checked(weights), mapper=self.hf_to_vllm_mapper)

    def _checked(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """Check expert and router tensors against the `submoe` block as they stream past:
        a mis-shaped or missing tensor is an error naming it, never a kernel crash."""
        expected = expected_expert_tensors(self.config.to_dict(), self.model.submoe)
        layers = range(self.model.start_layer, self.model.end_layer)
        expected = {k: v for k, v in expected.items() if int(k.split(".")[2]) in layers}
        seen = set()
        for name, tensor in weights:
            if name.startswith("model.layers.") and int(name.split(".")[2]) not in layers:
                yield name, tensor  # another pipeline stage's layer: vLLM skips it
                continue
            check_tensor_shape(name, tensor.shape, expected)
            seen.add(name)
            yield name, tensor
        check_all_present(seen, expected)
