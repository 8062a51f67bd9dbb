"""HC-SMoE (arXiv 2410.08589; github.com/wazenmai/HC-SMoE) and M-SMoE (arXiv 2310.01334,
github.com/UNITES-Lab/MC-SMoE): two published ways to group experts, both merged by the
frequency-weighted average Σ f_i W_i / Σ f_i (f = top-k selection counts).

HC-SMoE, as in `grouping_mixtral.py::group_experts_by_clustering_output` and
`merging/clustering.py`: each expert's feature is its mean output over all calibration tokens
(unnormalised), Euclidean distance, average linkage, cut at exactly N' clusters.

M-SMoE, as in `group_experts_globally_from_dominant_experts`: the most frequently routed experts
are the centres, similarity is the cosine of two experts' router-logit columns over all calibration
tokens (from the logits' Gram matrix, accumulated while calibration streams the layer),
and the remaining experts, most frequent first, join their most similar centre. Deliberate
difference: M-SMoE picks centres globally across layers (a per-layer budget from one global
frequency threshold); here the budget per layer is the user's `--num-experts`.
"""
from __future__ import annotations

import torch
from scipy.cluster.hierarchy import cut_tree, linkage

from ..calibration.stats import LayerStats
from ..moe_math import Experts
from .base import Grouping, Merge, WeightMerge
from .clustering import assign_to_centres, cosine_from_gram
from .merging import frequency_weighted


def average_linkage_clusters(features: torch.Tensor, k: int) -> list[list[int]]:
    """Agglomerative clustering (Euclidean, average linkage) of rows, cut at exactly k clusters."""
    if k >= len(features):
        return [[i] for i in range(len(features))]
    labels = cut_tree(linkage(features.double().numpy(), method="average", metric="euclidean"), n_clusters=k)[:, 0]
    return [[i for i, c in enumerate(labels.tolist()) if c == j] for j in range(k)]


def mean_output_clusters(stats: LayerStats, k: int) -> list[list[int]]:
    """HC-SMoE's grouping: average linkage on each expert's mean output over all calibration tokens."""
    return average_linkage_clusters(stats.mean_outputs, k)


def router_centres(stats: LayerStats, k: int) -> list[list[int]]:
    """M-SMoE's grouping: the k most frequent experts are centres, the rest join by router-logit similarity."""
    return assign_to_centres(stats.frequency, cosine_from_gram(stats.logit_gram), k)


class HCSMoE(WeightMerge):
    name = "hc-smoe"
    statistics = frozenset({"mean_outputs"})
    description = "hierarchical clustering (average linkage) of mean expert outputs; frequency-weighted merge"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        return Grouping(mean_output_clusters(stats, num_out))

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        return frequency_weighted(experts, members, stats)


class MSMoE(HCSMoE):
    name = "m-smoe"
    statistics = frozenset({"logit_gram"})
    description = "most frequent experts as centres, others join by router-logit similarity; frequency-weighted merge"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        return Grouping(router_centres(stats, num_out))
