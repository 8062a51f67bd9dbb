"""REAP pruning (Cerebras, arXiv 2510.13999; github.com/CerebrasResearch/reap).

Saliency of expert j = mean over the tokens routed to j of g_j(x) · ‖E_j(x)‖₂, with g_j the
router's softmax probability. As in the reference (`pruning_metrics.py`), g_j is the raw softmax
over all experts when the architecture does not renormalise its top-k (Mixtral's config has no
`norm_topk_prob`); the N' highest-scoring experts are kept. Deliberate difference: the mean runs
over the sampled calibration tokens (`--output-tokens`), where the reference uses every token.
"""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from .baselines import Pruning


def reap_scores(stats: LayerStats) -> torch.Tensor:
    """[N] REAP saliency; 0 for an expert calibration never routed to."""
    probs = torch.softmax(stats.router_logits.double(), dim=-1)  # [T, N]
    routed = stats.gate_weights() > 0  # [T, N] in the token's top-k
    norms = torch.linalg.vector_norm(stats.outputs.double(), dim=-1).T  # [T, N]
    count = routed.sum(0)
    return torch.where(count > 0, (probs * norms * routed).sum(0) / count.clamp_min(1), torch.zeros_like(probs[0]))


class REAP(Pruning):
    name = "reap"
    description = "keep the experts with the highest mean routed gate weight x output norm, drop the others (REAP)"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return reap_scores(stats)
