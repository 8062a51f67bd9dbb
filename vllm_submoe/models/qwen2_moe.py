"""SubMoEQwen2MoeForCausalLM: Qwen1.5-MoE / Qwen2-MoE: the shared expert and its sigmoid gate are served as they are.

vLLM's own Qwen2MoeForCausalLM, with each MoE layer's fused experts merged behind the checkpoint's remap.
"""
from vllm.model_executor.models import qwen2_moe

from .remapped_moe import SubMoEModel


class SubMoEQwen2MoeForCausalLM(SubMoEModel, qwen2_moe.Qwen2MoeForCausalLM):
    arch_module = qwen2_moe
