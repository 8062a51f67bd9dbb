"""SubMoEOlmoeForCausalLM: OLMoE: softmax top-k, no renormalisation by default.

vLLM's own OlmoeForCausalLM, with each MoE layer's fused experts merged behind the checkpoint's remap.
"""
from vllm.model_executor.models import olmoe

from .remapped_moe import SubMoEModel


class SubMoEOlmoeForCausalLM(SubMoEModel, olmoe.OlmoeForCausalLM):
    arch_module = olmoe
