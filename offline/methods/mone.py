"""MoNE: pruned experts replaced by novices, constant vectors (Chen et al., arXiv 2507.00390;
github.com/zxgx/mode-pd, `modepd/pruning/expert_prune.py: expert_prune_by_mone`).

Score of expert j ("fusion", the authors' default): its routing weight averaged over all
calibration tokens (0 where j is not in the token's top-k; the weight the model multiplies by)
times the norm of the per-dimension standard deviation of its output over the tokens routed to it.
The N' highest-scoring experts are kept; each other one stays in the router's top-k and serves its
novice: its mean output over the tokens routed to it, times its routing weight. Deliberate
differences from the authors' code: the variance is exact (theirs is a running estimate that skips
each expert's first batch, as llm-compressor's port fixes), and exactly N' experts are kept (theirs
keeps those strictly above the (N'+1)-th score, fewer on ties).
"""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts
from .base import Grouping
from .baselines import Pruning


def mone_scores(stats: LayerStats) -> torch.Tensor:
    """[N] routing weight per token times ‖std of the routed output‖."""
    return stats.routed_gate.double() * torch.linalg.vector_norm(stats.routed_var.double().sqrt(), dim=-1)


class MoNE(Pruning):
    name = "mone"
    corrects = True
    statistics = frozenset({"routed_outputs"})
    description = "keep the experts whose output varies most per routed weight; serve the others as their " \
                  "mean output, a constant vector the router still routes to (MoNE)"

    def __init__(self):
        super().__init__()
        self.drops_experts = False

    def settings(self) -> dict:
        return {"pruned_experts": "served as their mean routed output (novices)"}

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return mone_scores(stats)

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        pruned = super().group(stats, num_out, seed, experts)
        novices = torch.zeros_like(stats.routed_mean, dtype=torch.float32)
        novices[pruned.dropped] = stats.routed_mean[pruned.dropped].float()
        return Grouping(pruned.clusters, pruned.centres, pruned.scores, constant=pruned.dropped, correction=novices)
