"""REAP pruning (Cerebras, arXiv 2510.13999; github.com/CerebrasResearch/reap).

Saliency of expert j = mean over the tokens routed to j of g_j(x) · ‖E_j(x)‖₂, with g_j the
router's softmax probability. As in the reference (`pruning_metrics.py`), g_j is the raw softmax
over all experts when the architecture does not renormalise its top-k (Mixtral's config has no
`norm_topk_prob`); the mean runs over every calibration token routed to j, as in the reference
(accumulated while calibration streams the layer). For a sigmoid-scored router (DeepSeek-V3) g_j
is expert j's sigmoid score, without the score-correction bias (which picks experts, never
weighs them). The N' highest-scoring experts are kept and the others dropped from the router's top-k.
"""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from .baselines import Pruning


def reap_scores(stats: LayerStats) -> torch.Tensor:
    """[N] REAP saliency over all calibration tokens (accumulated in calibration); 0 for an expert
    calibration never routed to."""
    return stats.saliency


class REAP(Pruning):
    name = "reap"
    statistics = frozenset({"saliency"})
    description = "keep the experts with the highest mean routed gate weight x output norm, drop the others (REAP)"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return reap_scores(stats)


class MAN(Pruning):
    """MAN (Liu et al., arXiv 2606.15716; github.com/ZongfangLiu/unified-expert-pruning): the mean
    norm of an expert's output over the tokens routed to it, with no gate term and no frequency.
    Pruned experts are dropped from the top-k, as REAP's are."""

    name = "man"
    statistics = frozenset({"routed_outputs"})
    description = "keep the experts with the highest mean output norm on their routed tokens, drop the others (MAN)"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return stats.routed_norm.double()


class MSAN(MAN):
    """MSAN: MAN with the squared norm, E‖E_j(x)‖² = Σ_d (var_d + mean_d²) over the routed tokens."""

    name = "msan"
    description = "keep the experts with the highest mean squared output norm on their routed tokens, drop the others (MSAN)"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return (stats.routed_var.double() + stats.routed_mean.double() ** 2).sum(-1)
