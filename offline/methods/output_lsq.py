"""`output-lsq`, the project's own method: choose the grouping by measured output error, then fit
each merged expert's down projection to the remapped MoE's own objective.

Why: the published methods differ mostly in how they group (output k-means, hierarchical
clustering of mean outputs, frequent centres with router similarity), and which grouping is best
varies by layer and by model; and a weighted average of W_D ignores which tokens the merged expert
actually serves. Here every layer tries the three published groupings, merges each, and keeps the
one whose remapped MoE output is closest to the source's on held-out calibration tokens. The
merge keeps the frequency-weighted W_G, W_U (MergeMoE's T2, T3) and solves W_D by least squares
on the tokens routed to the cluster, each weighted by its routing weight into the cluster, target
Σ g_i E_i(x): exactly the cluster's share of the MoE output error. A ridge towards the weighted
average, chosen on held-out tokens from a grid that includes the average itself, keeps a cluster
with few routed tokens from overfitting.

`function_weight` > 0 also asks W_D to stay close to the cluster's function on every sampled token,
routed there or not (MergeMoE's target, the members' frequency-weighted output), and lets MergeMoE's
grouping compete: where a compressed model's drifted hidden states send tokens elsewhere, the
merged expert still computes something like its members. Whether that pays shows only in the
model's output, never in the layer's (benchmarks/ideas.py): `compress --choose-end-to-end` decides.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts, expert_hidden, weighted_expert_sum
from .base import Grouping, Merge, MethodError, WeightMerge, reduce_layer
from .clustering import kmeans_clusters, output_features
from .hcsmoe import mean_output_clusters, router_centres
from .mergemoe import MergeMoE
from .merging import frequency_weighted, least_squares_down, merge_weights, ridge_fits, with_down
from .output_error import output_error
from .reap import reap_scores

RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


def split_stats(stats: LayerStats, every: int = 5) -> tuple[LayerStats, LayerStats]:
    """(fit, held-out): every `every`-th sampled token is held out; frequency stays the full figure."""
    held = torch.zeros(len(stats.tokens), dtype=torch.bool)
    held[::every] = True
    return stats.subset(~held), stats.subset(held)


def candidate_groupings(stats: LayerStats, num_out: int, seed: int) -> dict[str, list[list[int]]]:
    """The three published groupings: Sub-MoE's, HC-SMoE's and M-SMoE's."""
    return {"output-kmeans": kmeans_clusters(output_features(stats.output_gram), num_out, seed),
            "output-hierarchical": mean_output_clusters(stats, num_out),
            "router-logit-centres": router_centres(stats, num_out)}


def weight_centre_grouping(stats: LayerStats, num_out: int, seed: int, experts: Experts) -> dict[str, Grouping]:
    """MergeMoE's grouping: the most frequent experts are centres, the others join the most similar by weights."""
    return {"weight-centres": MergeMoE().group(stats, num_out, seed, experts)}


def hybrid_groupings(stats: LayerStats, num_out: int, seed: int) -> dict[str, Grouping]:
    """Prune and merge in one layer: the d least salient experts (REAP's score) leave the top-k and
    Sub-MoE's output k-means groups the others, for d = all of the reduction (REAP itself) and half
    of it. Never under grouped routing (dropping would unbalance the groups), and never below top_k
    router experts (the format refuses a layer whose tokens cannot fill their top-k)."""
    n = len(stats.frequency)
    if stats.routing.num_groups > 1:
        return {}
    order = torch.argsort(reap_scores(stats), descending=True, stable=True).tolist()
    out = {}
    for drop in sorted({min(d, n - stats.top_k) for d in ((n - num_out) // 2, n - num_out)} - {0}):
        kept = sorted(order[:n - drop])
        features = output_features(stats.output_gram[kept][:, kept])
        clusters = [[kept[i] for i in c] for c in kmeans_clusters(features, num_out, seed)]
        out[f"drop-{drop}+output-kmeans"] = Grouping(clusters, dropped=sorted(order[n - drop:]))
    return out


class OutputLSQ(WeightMerge):
    """Ours. Per layer, three candidate groupings — Sub-MoE's k-means on outputs, HC-SMoE's
    average linkage on mean outputs, M-SMoE's frequent centres with router-logit similarity — are
    each merged and the one whose remapped MoE output is closest to the source's on held-out
    calibration tokens wins. Merging: frequency-weighted W_G and W_U; W_D fitted to the cluster's
    share of the MoE output (routed tokens, gate-weighted), with the ridge towards the weighted
    average chosen on held-out tokens from a grid that includes the average itself. With `hybrid`,
    prune-and-merge candidates (`hybrid_groupings`) compete too; with `function_weight`, MergeMoE's
    grouping, and W_D also fits the cluster's function (`function_rows`)."""

    name = "output-lsq"
    statistics = frozenset({"output_gram", "mean_outputs", "logit_gram"})
    description = ("ours: per layer the best of three groupings on held-out tokens; frequency-weighted W_G, W_U; "
                   "W_D by gate-weighted least squares on routed tokens, ridge chosen on held-out tokens")

    def __init__(self, align_neurons: bool = False, hybrid: bool = False, function_weight: float = 0.0):
        super().__init__(align_neurons)
        if not math.isfinite(function_weight) or function_weight < 0:
            raise MethodError(f"--function-weight must be a number >= 0, got {function_weight}")
        self.hybrid, self.function_weight = hybrid, function_weight
        if hybrid:
            self.statistics = type(self).statistics | {"saliency"}
        if function_weight:
            self.description = (f"{type(self).description}; W_D also fitted to the cluster's function on every "
                                f"sampled token (weight {function_weight:g}), MergeMoE's grouping a fourth candidate")

    def settings(self) -> dict:
        return {**super().settings(), "hybrid": self.hybrid, "function_weight": self.function_weight}

    def candidates(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> dict[str, Grouping]:
        out = {name: Grouping(c) for name, c in candidate_groupings(stats, num_out, seed).items()}
        if self.function_weight:
            out |= weight_centre_grouping(stats, num_out, seed, experts)
        return out | hybrid_groupings(stats, num_out, seed) if self.hybrid else out

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        fit, held = split_stats(stats)
        candidates = self.candidates(stats, num_out, seed, experts)
        errors = {name: output_error(held, reduce_layer(self, experts, fit, num_out, seed, g))
                  for name, g in candidates.items()}
        best = min(errors, key=errors.get)
        return replace(candidates[best], chosen_by=best, held_out_errors=errors)

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        avg = frequency_weighted(experts, members, stats)  # W_G, W_U stay the weighted averages
        g = stats.gate_weights()[:, members]  # [T, k] routing weight of each member on each token
        routed = g.sum(1) > 0
        if len(members) == 1 or routed.sum() < 10:
            return avg
        g, x = g[routed], stats.tokens[routed]
        # Row t: the cluster's contribution to the source MoE output, Σ_i g_ti E_i(x_t), against the
        # merged expert's, (Σ_i g_ti) W_D p(x_t): scaling p by the row weight makes it one LS problem.
        # Each member runs on the tokens it serves only (nothing of size members x tokens x H: at
        # DeepSeek-V3's shape a 100-expert cluster would take 37 GB, on tokens each serves 3% of).
        target = weighted_expert_sum(x, g.float(), stats.experts, members)
        hidden = expert_hidden(x, avg.expert.gate[0], avg.expert.up[0]) * g.sum(1, keepdim=True).to(x.dtype)
        held = torch.arange(len(x)) % 5 == 0
        prior = avg.expert.down[0]
        extra = self.function_rows(avg.expert, members, stats, hidden) if self.function_weight else None

        def rows(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if extra is None:
                return hidden[keep], target[keep]
            return torch.cat([hidden[keep], extra[0]]), torch.cat([target[keep], extra[1]])

        def held_error(w: torch.Tensor) -> float:  # on the routed rows alone: the served objective
            return torch.linalg.norm(target[held] - hidden[held] @ w.T).item()

        fits = ridge_fits(*rows(~held), prior, RIDGES)
        errors = {**{r: held_error(w) for r, w in fits.items()}, "average": held_error(prior)}
        ridge = min(errors, key=errors.get)
        down = prior if ridge == "average" else least_squares_down(*rows(torch.ones_like(held)), prior=prior, ridge=ridge)
        return with_down(avg, down, least_squares_tokens=int(routed.sum()), ridge=ridge)

    def function_rows(self, merged: Experts, members: list[int], stats: LayerStats,
                      routed_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row per sampled token, target the members' frequency-weighted output, scaled so that the
        rows weigh `function_weight` times the routed rows in all. (The held-out routed tokens are
        among them, as in the configuration measured: the ridge choice sees their function rows.)"""
        w = merge_weights(stats.frequency, members).float().expand(len(stats.tokens), -1)
        hidden = expert_hidden(stats.tokens, merged.gate[0], merged.up[0])
        target = weighted_expert_sum(stats.tokens, w, stats.experts, members)
        scale = (self.function_weight * routed_hidden.pow(2).sum() / hidden.pow(2).sum().clamp_min(1e-30)).sqrt()
        return scale * hidden, scale * target
