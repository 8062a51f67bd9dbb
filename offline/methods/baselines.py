"""Baselines: plain averaging, a uniformly random merge (the lower bound), frequency pruning."""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts
from .base import Grouping, Merge, Method, WeightMerge
from .clustering import assign_to_centres, cosine_similarity, kmeans_clusters, output_features
from .merging import uniform_average


class Average(WeightMerge):
    """Same output-similarity groups as Sub-MoE, merged by a uniform average (no frequencies)."""

    name = "average"
    description = "k-means on expert outputs; uniform average of each group"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        return Grouping(kmeans_clusters(output_features(stats.outputs), num_out, seed))

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        return uniform_average(experts, members)


class RandomMerge(Average):
    """Uniformly random groups of near-equal size, averaged: what any informed method must beat."""

    name = "random"
    description = "uniformly random groups, uniform average (a lower bound)"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        order = torch.randperm(len(stats.frequency), generator=torch.Generator().manual_seed(seed)).tolist()
        return Grouping([order[j::num_out] for j in range(num_out)])


class Pruning(Method):
    """Keep N' experts unchanged, chosen by `scores` (computed once per layer). In the remap format
    every router expert needs a target, so a dropped expert is served by the kept expert whose
    outputs are most similar to its own; `--export vanilla` instead drops its router row (true pruning)."""

    def scores(self, stats: LayerStats) -> torch.Tensor:
        raise NotImplementedError

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        scores = self.scores(stats)
        clusters = assign_to_centres(scores, cosine_similarity(stats.outputs), num_out)
        return Grouping(clusters, centres=[max(c, key=lambda i: (scores[i].item(), -i)) for c in clusters],
                        scores=scores)

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        return Merge(Experts(*(m[centre:centre + 1] for m in experts.matrices().values())), members, kept=centre)


class FrequencyPrune(Pruning):
    name = "freq-prune"
    description = "keep the most frequently routed experts; dropped ones reroute to the most similar kept one"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return stats.frequency
