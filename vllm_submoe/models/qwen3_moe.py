"""SubMoEQwen3MoeForCausalLM: Qwen3-MoE: top-k renormalised as `norm_topk_prob` says.

vLLM's own Qwen3MoeForCausalLM, with each MoE layer's fused experts merged behind the checkpoint's remap.
"""
from vllm.model_executor.models import qwen3_moe

from .remapped_moe import SubMoEModel


class SubMoEQwen3MoeForCausalLM(SubMoEModel, qwen3_moe.Qwen3MoeForCausalLM):
    arch_module = qwen3_moe
