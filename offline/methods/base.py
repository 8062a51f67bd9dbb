"""The method contract: a method `group`s a layer's router experts and `merge`s each group.

That is all a method defines. `reduce_layer` runs the two on one layer (checks, canonical order,
neuron alignment, one slot per merged expert) and `reduce_layers` on the layers a method groups
jointly (Sub-MoE's adaptive variant). Results are typed: a `Grouping` per layer, a `Merge` per
merged expert, a `LayerResult` the writer and the report read.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from submoe_format.checkpoint import dropped_experts
from submoe_format.errors import SubMoEError

from ..calibration.stats import ALL_STATISTICS, LayerStats
from ..moe_math import Experts, all_finite
from .alignment import align_to

MATRICES = ("gate", "up", "down")


class MethodError(SubMoEError):
    """Options a method cannot work with."""


@dataclass
class Grouping:
    """Which router experts share a merged expert."""

    clusters: list[list[int]]
    centres: list[int] | None = None  # per cluster, the member standing for it (None: the most frequent one)
    scores: torch.Tensor | None = None  # [N] per router expert, for methods that rank experts (pruning)
    dropped: list[int] = field(default_factory=list)  # router experts whose logits leave the top-k (pruning)
    constant: list[int] = field(default_factory=list)  # router experts routed as usual, served by `correction` alone
    correction: torch.Tensor | None = None  # [N, H] per router expert, added with its routing weight (MoNE)
    chosen_by: str | None = None  # a method that tries several groupings: the winner's name
    held_out_errors: dict[str, float] | None = None  # ... and each candidate's held-out output error


@dataclass
class Merge:
    """One merged expert and the figures the report gives for it (None: not applicable)."""

    expert: Experts  # leading dim 1
    members: list[int]
    weights: list[float] | None = None  # of the members, in the merge
    kept: int | None = None  # pruning: the member kept as it is
    score: float | None = None  # pruning: the kept member's score
    rank: dict[str, int] | None = None  # Sub-MoE: rank kept per matrix ...
    truncation_error: dict[str, float] | None = None  # ... and what truncating to it lost
    intra_rank: dict[str, int] | None = None  # Sub-MoE†: intra-expert low rank per matrix ...
    intra_error: dict[str, float] | None = None  # ... and its relative output error
    least_squares_tokens: int | None = None  # W_D fitted on this many tokens
    underdetermined: bool | None = None
    ridge: float | str | None = None  # output-lsq: the chosen ridge, or "average" when the average won

    def report(self) -> dict:
        out = {"members": self.members}
        for key in ("weights", "kept", "score", "least_squares_tokens", "underdetermined", "ridge"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key, suffix in (("rank", "rank"), ("truncation_error", "truncation_error"),
                            ("intra_rank", "intra_rank"), ("intra_error", "intra_error")):
            for m, v in (getattr(self, key) or {}).items():
                out[f"{m}_{suffix}"] = v
        return out


@dataclass
class LayerResult:
    experts: Experts  # [N', ...] merged experts
    expert_map: list[int | None]  # router expert -> merged expert (None: dropped)
    clusters: list[list[int]]
    representatives: list[int]  # router row kept per merged expert (vanilla export)
    merges: list[Merge] = field(default_factory=list)
    grouping: Grouping | None = None
    refinement: dict | None = None  # layer-wise refinement's held-out errors (methods/refine.py)
    constant: list[int] = field(default_factory=list)  # router experts served by their correction alone
    correction: torch.Tensor | None = None  # [N, H] float32 per router expert, added with its routing weight

    @property
    def dropped(self) -> list[int]:
        """Router experts whose logits leave the top-k (None in the map and not constant)."""
        return dropped_experts(self.expert_map, self.constant)


class Method(ABC):
    """An expert-reduction method: `group` then `merge` (see the module docstring)."""

    name: ClassVar[str]
    description: ClassVar[str]
    joint_layers: int = 1  # layers grouped jointly (Sub-MoE's adaptive variant: 2)
    align_neurons: bool = False  # permute members' neurons to the centre's before merging
    drops_experts: bool = False  # some router experts' logits leave the top-k (format v2)
    corrects: bool = False  # serves some router experts by correction vectors (format v4: MoNE's constants)
    # The all-token statistics it reads (calibration computes only these): "output_gram", "mean_outputs",
    # "gated_mean_outputs", "logit_gram", "saliency". Every expert on every token is the costly part: only
    # the first three need it.
    statistics: frozenset[str] = ALL_STATISTICS

    def settings(self) -> dict:
        return {}

    @abstractmethod
    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        ...

    @abstractmethod
    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        """Merge the members of one cluster into a single expert (leading dim 1)."""

    def group_jointly(self, stats: list[LayerStats], num_out: int, seed: int) -> Grouping:
        raise NotImplementedError(f"{self.name} groups one layer at a time")


class WeightMerge(Method):
    """A method that merges weights, and so can align the members' neurons first (as M-SMoE does)."""

    def __init__(self, align_neurons: bool = False):
        self.align_neurons = align_neurons

    def settings(self) -> dict:
        return {"align_neurons": self.align_neurons}


def reduce_layer(method: Method, experts: Experts, stats: LayerStats, num_out: int, seed: int,
                 grouping: Grouping | None = None) -> LayerResult:
    """Group (unless `grouping` is given) and merge one layer's experts."""
    check_finite(experts.matrices(), "the source experts")
    check_finite({"tokens": stats.tokens, "moe_output": stats.moe_output, "router_logits": stats.router_logits},
                 "the calibration statistics")
    grouping = canonical(grouping or method.group(stats, num_out, seed, experts), stats.frequency)
    out, merges = Experts.empty(len(grouping.clusters), experts), []
    for j, (members, centre) in enumerate(zip(grouping.clusters, grouping.centres)):
        source = experts
        if method.align_neurons and len(members) > 1:
            source = align_to(experts, members, centre=dominant(stats.frequency, members))
        m = method.merge(source, members, centre, stats)
        if grouping.scores is not None:
            m.score = round(grouping.scores[centre].item(), 6)
        out.gate[j], out.up[j], out.down[j] = m.expert.gate[0], m.expert.up[0], m.expert.down[0]
        # The merge keeps its expert as written (views into `out`), not its float32 working copy: at
        # DeepSeek-V3's shape 128 of those are 22.5 GB.
        m.expert = Experts(out.gate[j:j + 1], out.up[j:j + 1], out.down[j:j + 1])
        merges.append(m)
    check_finite(out.matrices(), "the merged experts")
    expert_map = clusters_to_map(grouping.clusters, len(experts), [*grouping.dropped, *grouping.constant])
    return LayerResult(out, expert_map, grouping.clusters, list(grouping.centres), merges, grouping,
                       constant=sorted(grouping.constant), correction=grouping.correction)


def reduce_layers(method: Method, layers: list[tuple[Experts, LayerStats]], budgets: list[int],
                  seed: int) -> list[LayerResult]:
    """Reduce `method.joint_layers` adjacent layers: one grouping for all when the method groups jointly."""
    if method.joint_layers == 1 or len(layers) == 1:
        return [reduce_layer(method, e, s, n, seed) for (e, s), n in zip(layers, budgets)]
    if len(set(budgets)) != 1:
        raise MethodError(f"--adaptive clusters adjacent layers jointly, so their --num-experts must be equal; "
                          f"got {budgets}")
    joint = method.group_jointly([s for _, s in layers], budgets[0], seed)
    return [reduce_layer(method, e, s, budgets[0], seed, Grouping(joint.clusters)) for e, s in layers]


def canonical(grouping: Grouping, frequency: torch.Tensor) -> Grouping:
    """Sorted members, clusters ordered by their smallest member, a centre for each: same grouping,
    same file."""
    centres = grouping.centres or [None] * len(grouping.clusters)
    pairs = sorted(((sorted(int(i) for i in c), centre) for c, centre in zip(grouping.clusters, centres) if len(c)),
                   key=lambda p: p[0][0])
    return replace(grouping, clusters=[c for c, _ in pairs],
                   centres=[dominant(frequency, c) if centre is None else int(centre) for c, centre in pairs])


def dominant(frequency: torch.Tensor, members: list[int]) -> int:
    """The most frequently routed member (lowest index on ties)."""
    return max(members, key=lambda i: (frequency[i].item(), -i))


def clusters_to_map(clusters: list[list[int]], num_experts: int, dropped: list[int] = ()) -> list[int | None]:
    """Router expert -> its cluster's index, None for one no merged expert serves (dropped or
    constant); every other must be in a cluster."""
    expert_map: list[int | None] = [-1] * num_experts
    for i in dropped:
        expert_map[i] = None
    for j, members in enumerate(clusters):
        for i in members:
            expert_map[i] = j
    if -1 in expert_map:
        raise MethodError(f"grouping left router expert(s) {[i for i, j in enumerate(expert_map) if j == -1]} "
                          f"unassigned")
    return expert_map


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if not all_finite(t):
            label = f"W_{name}" if name in MATRICES else name
            raise MethodError(f"{label} of {what} has NaN or inf values: the source checkpoint is not finite "
                              f"there (check it, e.g. with safetensors, before compressing)")
