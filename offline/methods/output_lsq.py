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
"""
from __future__ import annotations

import torch

from ..clustering import kmeans_clusters, output_features
from ..moe_math import Experts, all_expert_outputs, expert_hidden
from .base import FrequencyWeightedMerge, LayerResult, LayerStats
from .hcsmoe import HCSMoE, MSMoE
from .mergemoe import least_squares_down


def split_stats(stats: LayerStats, every: int = 5) -> tuple[LayerStats, LayerStats]:
    """(fit, held-out): every `every`-th sampled token is held out; frequency stays the full figure."""
    held = torch.zeros(len(stats.tokens), dtype=torch.bool)
    held[::every] = True
    part = lambda m: LayerStats(stats.frequency, stats.tokens[m], stats.outputs[:, m], stats.router_logits[m],  # noqa: E731
                                stats.top_k, stats.samples, stats.routing)
    return part(~held), part(held)


def remapped_output_error(stats: LayerStats, result) -> float:
    """‖remapped MoE output − source MoE output‖ / ‖source‖ on the stats' tokens (routing included)."""
    g = stats.gate_weights().to(stats.outputs.dtype)  # [T, N]
    source = torch.einsum("tn,ntd->td", g, stats.outputs)
    merged = all_expert_outputs(stats.tokens, result.experts)[torch.tensor(result.expert_map)]  # [N, T, H]
    served = torch.einsum("tn,ntd->td", g, merged)
    return (torch.linalg.norm(served - source) / torch.linalg.norm(source).clamp_min(1e-30)).item()


RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


class OutputLSQ(FrequencyWeightedMerge):
    """Ours. Per layer, three candidate groupings — Sub-MoE's k-means on outputs, HC-SMoE's
    average linkage on mean outputs, M-SMoE's frequent centres with router-logit similarity — are
    each merged and the one whose remapped MoE output is closest to the source's on held-out
    calibration tokens wins. Merging: frequency-weighted W_G and W_U; W_D fitted to the cluster's
    share of the MoE output (routed tokens, gate-weighted), with the ridge towards the weighted
    average chosen on held-out tokens from a grid that includes the average itself."""

    name = "output-lsq"
    description = ("ours: per layer the best of three groupings on held-out tokens; frequency-weighted W_G, W_U; "
                   "W_D by gate-weighted least squares on routed tokens, ridge chosen on held-out tokens")

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> list[list[int]]:
        return kmeans_clusters(output_features(stats.outputs), num_out, seed)

    def candidate_groupings(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> dict:
        return {"output-kmeans": self.group(stats, num_out, seed, experts),
                "output-hierarchical": HCSMoE().group(stats, num_out, seed, experts),
                "router-logit-centres": MSMoE().group(stats, num_out, seed, experts)}

    def reduce_layer(self, experts: Experts, stats: LayerStats, num_out: int, seed: int,
                     clusters: list[list[int]] | None = None) -> LayerResult:
        if clusters is not None:
            return super().reduce_layer(experts, stats, num_out, seed, clusters)
        fit, held = split_stats(stats)
        candidates = self.candidate_groupings(stats, num_out, seed, experts)
        errors = {name: remapped_output_error(held, super(OutputLSQ, self).reduce_layer(experts, fit, num_out, seed, c))
                  for name, c in candidates.items()}
        best = min(errors, key=errors.get)
        result = super().reduce_layer(experts, stats, num_out, seed, candidates[best])
        result.info.update(grouping=best, held_out_error_by_grouping=errors)
        return result

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        avg, info = super().merge(experts, members, stats)  # W_G, W_U stay the weighted averages
        g = stats.gate_weights()[:, members]  # [T, k] routing weight of each member on each token
        routed = g.sum(1) > 0
        if len(members) == 1 or routed.sum() < 10:
            return avg, info
        g, x = g[routed], stats.tokens[routed]
        # Row t: the cluster's contribution to the source MoE output, Σ_i g_ti E_i(x_t), against the
        # merged expert's, (Σ_i g_ti) W_D p(x_t): scaling p by the row weight makes it one LS problem.
        target = torch.einsum("tk,ktd->td", g.to(stats.outputs.dtype), stats.outputs[members][:, routed])
        hidden = expert_hidden(x, avg.gate[0], avg.up[0]) * g.sum(1, keepdim=True).to(x.dtype)
        held = torch.arange(len(x)) % 5 == 0
        prior = avg.down[0]
        held_err = lambda W: torch.linalg.norm(target[held] - hidden[held] @ W.T).item()  # noqa: E731
        fits = {r: least_squares_down(hidden[~held], target[~held], prior=prior, ridge=r) for r in RIDGES}
        errors = {**{r: held_err(W) for r, W in fits.items()}, None: held_err(prior)}
        ridge = min(errors, key=errors.get)
        down = prior if ridge is None else least_squares_down(hidden, target, prior=prior, ridge=ridge)
        info.update(least_squares_tokens=int(routed.sum()), ridge=ridge)
        return Experts(avg.gate, avg.up, down.unsqueeze(0)), info
