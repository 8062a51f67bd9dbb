"""One interface for every expert-reduction method: group a layer's experts, merge each group."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..moe_math import Experts


@dataclass
class LayerStats:
    """What calibration measured for one MoE layer."""

    frequency: torch.Tensor  # [N] share of top-k selections per router expert (sums to 1)
    tokens: torch.Tensor  # [T, H] sampled MoE inputs
    outputs: torch.Tensor  # [N, T, H] every expert's output on those tokens
    router_logits: torch.Tensor  # [T, N]


@dataclass
class LayerResult:
    experts: Experts  # [N', ...] merged experts
    expert_map: list[int]  # router expert -> merged expert
    clusters: list[list[int]]
    info: dict = field(default_factory=dict)  # per-method figures for the report


class MethodError(ValueError):
    """Options a method cannot work with."""


class ExpertReducer(ABC):
    """A method: `group` chooses which router experts share a merged expert, `merge` builds it."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def group(self, stats: LayerStats, num_out: int, seed: int) -> list[list[int]]:
        ...

    @abstractmethod
    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        """Merge the members of one cluster into a single expert (leading dim 1)."""

    def settings(self) -> dict:
        return {}

    def reduce_layer(self, experts: Experts, stats: LayerStats, num_out: int, seed: int) -> LayerResult:
        clusters = canonical_clusters(self.group(stats, num_out, seed))
        merged, infos = [], []
        for members in clusters:
            m, info = self.merge(experts, members, stats)
            merged.append(m)
            infos.append(info)
        out = Experts(*(torch.cat([getattr(m, k) for m in merged]) for k in ("gate", "up", "down")))
        return LayerResult(out, clusters_to_map(clusters, len(experts)), clusters, {"clusters": infos})


def canonical_clusters(clusters: list[list[int]]) -> list[list[int]]:
    """Sorted members, clusters ordered by their smallest member: same grouping, same file."""
    clusters = [sorted(int(i) for i in c) for c in clusters if len(c)]
    return sorted(clusters, key=lambda c: c[0])


def clusters_to_map(clusters: list[list[int]], num_experts: int) -> list[int]:
    expert_map = [-1] * num_experts
    for j, members in enumerate(clusters):
        for i in members:
            expert_map[i] = j
    if -1 in expert_map:
        raise MethodError(f"grouping left router expert(s) {[i for i, j in enumerate(expert_map) if j < 0]} unassigned")
    return expert_map


def merge_weights(frequency: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Normalised frequency weights; a cluster that calibration never routed to averages uniformly."""
    f = frequency[members].double()
    return f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / len(members))
