"""SubMoEDeepseekV2ForCausalLM: DeepSeek-V2 / V2-Lite: shared experts, dense first layers, grouped top-k and the routed scaling factor, all as vLLM's DeepSeek-V2 does.

vLLM's own DeepseekV2ForCausalLM, with each MoE layer's fused experts merged behind the checkpoint's remap.
"""
from vllm.model_executor.models import deepseek_v2

from .remapped_moe import SubMoEModel


class SubMoEDeepseekV2ForCausalLM(SubMoEModel, deepseek_v2.DeepseekV2ForCausalLM):
    arch_module = deepseek_v2
