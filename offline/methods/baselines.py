"""Baselines: plain averaging, a uniformly random merge (the lower bound), frequency pruning."""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts
from .base import Grouping, Merge, Method, WeightMerge
from .clustering import assign_to_centres, cosine_from_gram, kmeans_clusters, output_features
from .merging import uniform_average


class Average(WeightMerge):
    """Same output-similarity groups as Sub-MoE, merged by a uniform average (no frequencies)."""

    name = "average"
    statistics = frozenset({"output_gram"})
    description = "k-means on expert outputs; uniform average of each group"

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        return Grouping(kmeans_clusters(output_features(stats.output_gram), num_out, seed))

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        return uniform_average(experts, members)


class RandomMerge(Average):
    """Uniformly random groups of near-equal size, averaged: what any informed method must beat."""

    name = "random"
    description = "uniformly random groups, uniform average (a lower bound)"
    statistics = frozenset()

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        order = torch.randperm(len(stats.frequency), generator=torch.Generator().manual_seed(seed)).tolist()
        return Grouping([order[j::num_out] for j in range(num_out)])


class Pruning(Method):
    """Keep N' experts unchanged, chosen by `scores` (computed once per layer), and drop the others
    as the authors publish it: a dropped expert's router logit leaves the top-k (format v2; an
    N'-row router with `--export vanilla`). `substitute` instead sends a pruned expert's tokens to
    the kept expert whose outputs are most similar to its own (its router row stays)."""

    def __init__(self, substitute_pruned: bool = False):
        self.substitute_pruned = substitute_pruned
        self.drops_experts = not substitute_pruned
        self.statistics = type(self).statistics | ({"output_gram"} if substitute_pruned else set())

    def settings(self) -> dict:
        return {"pruned_experts": "substituted by the most similar kept expert" if self.substitute_pruned
                else "dropped from the router's top-k"}

    def scores(self, stats: LayerStats) -> torch.Tensor:
        raise NotImplementedError

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        scores = self.scores(stats)
        if not self.substitute_pruned:
            kept = torch.argsort(scores, descending=True, stable=True)[:num_out].tolist()
            return Grouping([[i] for i in kept], centres=kept, scores=scores,
                            dropped=sorted(set(range(len(scores))) - set(kept)))
        clusters = assign_to_centres(scores, cosine_from_gram(stats.output_gram), num_out)
        return Grouping(clusters, centres=[max(c, key=lambda i: (scores[i].item(), -i)) for c in clusters],
                        scores=scores)

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        return Merge(Experts(*(m[centre:centre + 1] for m in experts.matrices().values())), members, kept=centre)


class FrequencyPrune(Pruning):
    name = "freq-prune"
    statistics = frozenset()
    description = "keep the most frequently routed experts, drop the others from the router's top-k"

    def scores(self, stats: LayerStats) -> torch.Tensor:
        return stats.frequency
