"""The simplest baselines: plain averaging and frequency pruning."""
from __future__ import annotations

import torch

from ..clustering import cosine_similarity, kmeans_clusters, output_features
from ..moe_math import Experts
from .base import ExpertReducer, LayerStats


class Average(ExpertReducer):
    """Same output-similarity groups as Sub-MoE, merged by a uniform average (no frequencies)."""

    name = "average"
    description = "k-means on expert outputs; uniform average of each group"

    def group(self, stats: LayerStats, num_out: int, seed: int) -> list[list[int]]:
        return kmeans_clusters(output_features(stats.outputs), num_out, seed)

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        return Experts(*(m[members].mean(0, keepdim=True) for m in experts.matrices().values())), \
            {"members": members}


class FrequencyPrune(ExpertReducer):
    """Keep the N' most frequently routed experts unchanged. In the remap format every router
    expert needs a target, so a dropped expert is served by the kept expert whose outputs are
    most similar to its own."""

    name = "freq-prune"
    description = "keep the most frequently routed experts; dropped ones reroute to the most similar kept one"

    def group(self, stats: LayerStats, num_out: int, seed: int) -> list[list[int]]:
        kept = torch.argsort(stats.frequency, descending=True, stable=True)[:num_out].tolist()
        sim = cosine_similarity(stats.outputs)
        clusters = {k: [k] for k in kept}
        for i in range(len(stats.frequency)):
            if i not in clusters:
                clusters[max(kept, key=lambda k: sim[i, k].item())].append(i)
        return list(clusters.values())

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        keep = max(members, key=lambda i: stats.frequency[i].item())
        return Experts(*(m[keep:keep + 1] for m in experts.matrices().values())), {"kept": keep, "members": members}
