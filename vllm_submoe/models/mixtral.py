"""SubMoEMixtralForCausalLM: Mixtral (mistralai/Mixtral-8x7B and kin).

vLLM's own MixtralForCausalLM, with each MoE layer's fused experts merged behind the checkpoint's remap.
"""
from vllm.model_executor.models import mixtral

from .remapped_moe import SubMoEModel


class SubMoEMixtralForCausalLM(SubMoEModel, mixtral.MixtralForCausalLM):
    arch_module = mixtral
