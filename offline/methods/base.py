"""One interface for every expert-reduction method: group a layer's experts, merge each group."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..alignment import align_to
from ..moe_math import Experts, Routing, all_finite, as_routing


@dataclass
class LayerStats:
    """What calibration measured for one MoE layer."""

    frequency: torch.Tensor  # [N] share of top-k selections per router expert (sums to 1)
    tokens: torch.Tensor  # [T, H] sampled MoE inputs
    outputs: torch.Tensor  # [N, T, H] every expert's output on those tokens
    router_logits: torch.Tensor  # [T, N] on the sampled tokens
    top_k: int = 2
    samples: int = 0  # calibration windows behind the figures (MergeMoE's collapse threshold)
    routing: Routing | None = None  # the source architecture's routing; None: Mixtral's with top_k

    def __post_init__(self):
        self.routing = as_routing(self.routing or self.top_k)
        self.top_k = self.routing.top_k

    def gate_weights(self) -> torch.Tensor:
        """[T, N] the source routing weight of every expert on every sampled token (0 if not in its top-k)."""
        w, ids = self.routing(self.router_logits)
        return torch.zeros(self.router_logits.shape, dtype=w.dtype).scatter_(1, ids, w)


@dataclass
class LayerResult:
    experts: Experts  # [N', ...] merged experts
    expert_map: list[int]  # router expert -> merged expert
    clusters: list[list[int]]
    info: dict = field(default_factory=dict)  # per-method figures for the report
    representatives: list[int] = field(default_factory=list)  # router row kept per merged expert (vanilla export)


class MethodError(ValueError):
    """Options a method cannot work with."""


class ExpertReducer(ABC):
    """A method: `group` chooses which router experts share a merged expert, `merge` builds it.

    Methods that merge weights accept `align_neurons`: each member's intermediate neurons are
    permuted to match the cluster's most frequent member before merging (as M-SMoE does)."""

    name: ClassVar[str]
    description: ClassVar[str]
    merges_weights: ClassVar[bool] = True  # False for pruning: nothing to align
    layers_per_group: ClassVar[int] = 1  # layers grouped jointly (Sub-MoE's adaptive variant: 2)

    def __init__(self, align_neurons: bool = False):
        self.align_neurons = align_neurons

    @abstractmethod
    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> list[list[int]]:
        ...

    @abstractmethod
    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        """Merge the members of one cluster into a single expert (leading dim 1)."""

    def settings(self) -> dict:
        return {"align_neurons": self.align_neurons} if self.merges_weights else {}

    def reduce_layer(self, experts: Experts, stats: LayerStats, num_out: int, seed: int,
                     clusters: list[list[int]] | None = None) -> LayerResult:
        check_finite(experts.matrices(), "the source experts")
        check_finite({"tokens": stats.tokens, "outputs": stats.outputs, "router_logits": stats.router_logits},
                     "the calibration statistics")
        if clusters is None:
            clusters = self.group(stats, num_out, seed, experts)
        clusters = canonical_clusters(clusters)
        out, infos = Experts.empty(len(clusters), experts), []
        for j, members in enumerate(clusters):  # each merge lands in its slot at once: no second copy of the layer
            source = experts
            if self.align_neurons and len(members) > 1:
                source = align_to(experts, members, centre=dominant(stats.frequency, members))
            m, info = self.merge(source, members, stats)
            out.gate[j], out.up[j], out.down[j] = m.gate[0], m.up[0], m.down[0]
            infos.append(info)
        check_finite(out.matrices(), "the merged experts")
        return LayerResult(out, clusters_to_map(clusters, len(experts)), clusters, {"clusters": infos},
                           [self.representative(members, stats) for members in clusters])

    def representative(self, members: list[int], stats: LayerStats) -> int:
        """The member whose router row stands for the merged expert in an N'-row (vanilla) router."""
        return dominant(stats.frequency, members)

    def reduce_layers(self, layers: list[tuple[Experts, LayerStats]], budgets: list[int], seed: int) -> list[LayerResult]:
        """Reduce `layers_per_group` adjacent layers; one at a time unless a method groups jointly."""
        return [self.reduce_layer(e, s, n, seed) for (e, s), n in zip(layers, budgets)]


class FrequencyWeightedMerge(ExpertReducer):
    """Merge = Σ f_i W_i / Σ f_i for each of W_G, W_U, W_D (HC-SMoE, M-SMoE; the start of MergeMoE's)."""

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        w = merge_weights(stats.frequency, members)
        return weighted_average(experts, members, w), {"members": members, "weights": [round(x, 6) for x in w.tolist()]}


def dominant(frequency: torch.Tensor, members: list[int]) -> int:
    """The most frequently routed member (lowest index on ties)."""
    return max(members, key=lambda i: (frequency[i].item(), -i))


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


def weighted_average(experts: Experts, members: list[int], weights: torch.Tensor) -> Experts:
    """Σ w_i W_i for each of W_G, W_U, W_D (leading dim 1)."""
    return Experts(*(weighted_sum(m[members], weights).unsqueeze(0) for m in experts.matrices().values()))


def weighted_sum(mats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k mats[k] for mats [k, out, in], in the matrices' dtype."""
    return torch.einsum("k,kij->ij", weights.to(mats.dtype), mats)


def routed_mask(stats: LayerStats, members: list[int]) -> torch.Tensor:
    """[T] bool: sampled tokens whose top-k includes at least one member (where the merged expert acts)."""
    return stats.gate_weights()[:, members].sum(1) > 0


def routed_tokens(stats: LayerStats, members: list[int]) -> torch.Tensor:
    """Tokens routed to the cluster; all sampled tokens if calibration routed none there."""
    mask = routed_mask(stats, members)
    return stats.tokens[mask] if mask.any() else stats.tokens


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if not all_finite(t):
            label = f"W_{name}" if name in ("gate", "up", "down") else name
            raise MethodError(f"{label} of {what} has NaN or inf values: the source checkpoint is not finite "
                              f"there (check it, e.g. with safetensors, before compressing)")
