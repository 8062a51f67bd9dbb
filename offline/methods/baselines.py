"""Baselines: plain averaging, a uniformly random merge (the lower bound), frequency pruning."""
from __future__ import annotations

import torch

from ..clustering import assign_to_centres, cosine_similarity, kmeans_clusters, output_features
from ..moe_math import Experts
from .base import ExpertReducer, LayerStats, weighted_average


class Average(ExpertReducer):
    """Same output-similarity groups as Sub-MoE, merged by a uniform average (no frequencies)."""

    name = "average"
    description = "k-means on expert outputs; uniform average of each group"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> list[list[int]]:
        return kmeans_clusters(output_features(stats.outputs), num_out, seed)

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        return weighted_average(experts, members, torch.full((len(members),), 1.0 / len(members))), \
            {"members": members}


class RandomMerge(Average):
    """Uniformly random groups of near-equal size, averaged: what any informed method must beat."""

    name = "random"
    description = "uniformly random groups, uniform average (a lower bound)"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> list[list[int]]:
        order = torch.randperm(len(stats.frequency), generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[j::num_out] for j in range(num_out)]


class Pruning(ExpertReducer):
    """Keep N' experts unchanged, chosen by `scores`. In the remap format every router expert needs
    a target, so a dropped expert is served by the kept expert whose outputs are most similar to
    its own; `--export vanilla` instead drops its router row (true pruning)."""

    merges_weights = False

    def __init__(self):
        super().__init__(align_neurons=False)

    def scores(self, stats: LayerStats) -> torch.Tensor:
        raise NotImplementedError

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> list[list[int]]:
        return assign_to_centres(self.scores(stats), cosine_similarity(stats.outputs), num_out)

    def representative(self, members: list[int], stats: LayerStats) -> int:
        scores = self.scores(stats)
        return max(members, key=lambda i: (scores[i].item(), -i))

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        keep = self.representative(members, stats)
        return Experts(*(m[keep:keep + 1] for m in experts.matrices().values())), \
            {"kept": keep, "members": members, "score": round(self.scores(stats)[keep].item(), 6)}


class FrequencyPrune(Pruning):
    name = "freq-prune"
    description = "keep the most frequently routed experts; dropped ones reroute to the most similar kept one"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return stats.frequency
