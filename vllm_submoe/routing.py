"""Remapped routing: the source model's top-k over N router experts, then ids -> merged ids.

Pure torch, device-agnostic, no host synchronisation: safe under torch.compile and CUDA graphs.
"""

import torch
from torch import nn


class RemappedSoftmaxTopK(nn.Module):
    """Mixtral routing (softmax over N logits, top-k, optional renormalisation) followed by
    `expert_map[ids]`. Passed to vLLM's fused MoE as `custom_routing_function`.

    Two chosen router experts that map to one merged expert both stay in the list: the fused
    kernels accept duplicate ids and add their weights, which is exactly the merged forward.
    """

    def __init__(self, expert_map: list[int]):
        super().__init__()
        # Built under vLLM's device context at model construction, so it already lives on
        # the model's device; non-persistent: it comes from config.json, not the weights.
        self.register_buffer("expert_map", torch.tensor(expert_map, dtype=torch.int32), persistent=False)

    def forward(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # Top-k on the logits, then softmax over the k chosen: equal to Mixtral's softmax over
        # all N, top-k, renormalise, in fewer ops (vLLM's own CPU router does the same).
        logits = gating_output.float()
        top_logits, ids = torch.topk(logits, topk, dim=-1)
        if renormalize:
            weights = torch.softmax(top_logits, dim=-1)
        else:
            weights = (top_logits - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
        return weights, self.expert_map[ids.long()]
