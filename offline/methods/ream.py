"""REAM (arXiv 2604.04356; github.com/SamsungSAILMontreal/ream), as in `ream/ream.py::pseudo_group`
and `ream/merger.py::Merger._merge` with the authors' defaults (grouping "ream", merging
"logits+weights", saliency "reap", C = 16, use_gate_output and gated_sim on).

    centroids  the N' experts of highest REAP saliency
    distance   1 − ½ (output similarity + gate similarity): output similarity is (cos + 1) / 2 of two
               experts' mean gate-weighted outputs p_i(x) E_i(x) over all calibration tokens; gate
               similarity is 1 − d_ij / max d, d the Euclidean distance of the unit-normalised
               router-logit columns (from the logits' Gram matrix, accumulated over all tokens)
    grouping   each centroid, most salient first, takes its closest still unassigned experts until
               its group holds C (C = 0: every expert joins its closest centroid, MC-SMoE's rule)
    merge      each member's neurons permuted to the centroid's (Hungarian on the summed Euclidean
               distances of their unit-normalised activations on the sampled tokens and of their
               unit-normalised [W_G row, W_U row, W_D column], PCA-reduced to 64 dimensions over
               the layer's neurons), then averaged with weights ∝ saliency
    router     the centroid's row: `--export vanilla` writes the published N'-row checkpoint

Deliberate differences. Saliency is REAP's p·‖E(x)‖ over routed tokens (our `reap`); the authors'
code feeds REAP the already gate-weighted outputs, which weighs by p²‖E(x)‖. Neuron activations are
taken on the pipeline's sampled tokens (`--output-tokens`) rather than 32k sampled. The PCA basis is
fitted on at most 2^16 of the layer's neuron rows (all of them on the stand-ins). Hidden states come
from the source layers (the authors pass them through each merged layer: sequential merging).
"""
from __future__ import annotations

import weakref

import torch
from scipy.optimize import linear_sum_assignment

from ..calibration.stats import LayerStats
from ..moe_math import Experts, expert_hidden
from .alignment import neuron_features, permute_neurons
from .base import Grouping, Merge, Method, MethodError
from .clustering import cosine_from_gram
from .merging import weighted_average

PCA_DIM, PCA_ROWS = 64, 1 << 16


def ream_saliency(stats: LayerStats) -> torch.Tensor:
    """REAP saliency with an expert calibration never routed to raised to min(0.5, the least non-zero
    one), so it can still be merged (as the authors do)."""
    s = stats.saliency.double().clone()
    if (s > 0).any():
        s[s == 0] = min(0.5, s[s > 0].min().item())
    return s


def ream_distances(stats: LayerStats) -> torch.Tensor:
    """[N, N] REAM's expert distance: 1 − mean of output similarity and gate similarity (0 on the diagonal)."""
    m = stats.gated_mean_outputs.double()
    sim_out = (torch.nn.functional.cosine_similarity(m[:, None], m[None, :], dim=-1, eps=1e-8) + 1) / 2
    d_gate = (2 - 2 * cosine_from_gram(stats.logit_gram.double())).clamp_min(0).sqrt()
    sim_gate = 1 - d_gate / d_gate.max().clamp_min(1e-12)
    d = 1 - (sim_out + sim_gate) / 2
    return d.fill_diagonal_(0)


def pseudo_group(saliency: torch.Tensor, distance: torch.Tensor, k: int, group_size: int) -> tuple[list[list[int]], list[int]]:
    """REAM's grouping: (clusters, each cluster's centroid)."""
    n = len(saliency)
    if group_size > 0 and k * group_size < n:  # (the authors check k < n // C, and assert after)
        raise MethodError(f"REAM's groups of at most --group-size {group_size} cannot cover {n} experts with {k} "
                          f"centroids: raise --group-size to at least {-(-n // k)} or keep more experts")
    centroids = torch.argsort(saliency, descending=True, stable=True)[:k].tolist()
    label = {c: j for j, c in enumerate(centroids)}
    if group_size > 0:
        for c in centroids:
            group = [c]
            for i in torch.argsort(distance[c], stable=True).tolist():
                if len(group) >= group_size:
                    break
                if i not in label:
                    group.append(i)
                    label[i] = label[c]
            if len(label) == n:
                break
    for i in range(n):  # C = 0 (MC-SMoE's rule): the closest centroid
        if i not in label:
            label[i] = min(range(k), key=lambda j: distance[centroids[j], i].item())
    return [[i for i in range(n) if label[i] == j] for j in range(k)], centroids


def weight_pca(experts: Experts, dim: int = PCA_DIM, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, projection [3H, dim]) of the layer's unit-normalised neuron rows [W_G row, W_U row, W_D column]."""
    rows = torch.cat([unit_rows(neuron_features(experts, e).float()) for e in range(len(experts))])
    gen = torch.Generator().manual_seed(seed)
    fit = rows[torch.randperm(len(rows), generator=gen)[:PCA_ROWS]] if len(rows) > PCA_ROWS else rows
    mean = fit.mean(0, keepdim=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _, s, v = torch.pca_lowrank(fit - mean, q=min(dim, *fit.shape))
    return mean, v * s


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-8)


def neuron_permutation(centroid_act: torch.Tensor, member_act: torch.Tensor, centroid_w: torch.Tensor,
                       member_w: torch.Tensor) -> torch.Tensor:
    """perm such that member neuron perm[j] is matched to centroid neuron j: least summed distance of
    unit-normalised activations [I, T] and unit-normalised PCA weight features [I, dim]."""
    cost = torch.cdist(unit_rows(centroid_act), unit_rows(member_act)) + torch.cdist(unit_rows(centroid_w),
                                                                                    unit_rows(member_w))
    _, cols = linear_sum_assignment(cost.double().numpy())
    return torch.from_numpy(cols)


def ream_merge(experts: Experts, members: list[int], centroid: int, saliency: torch.Tensor, tokens: torch.Tensor,
               pca: tuple[torch.Tensor, torch.Tensor]) -> Merge:
    """Σ w_i P_i(W_i), w ∝ saliency, every member P_i-permuted to the centroid's neurons."""
    order = [centroid] + [i for i in members if i != centroid]
    mean, proj = pca

    def act(e):
        return expert_hidden(tokens, *(m.float() for m in experts.expert(e)[:2])).T  # [I, T]

    def feat(e):
        return (unit_rows(neuron_features(experts, e).float()) - mean) @ proj

    ref_act, ref_w = act(centroid), feat(centroid)
    mats = [list(experts.expert(centroid))]
    for e in order[1:]:
        mats.append(list(permute_neurons(experts, e, neuron_permutation(ref_act, act(e), ref_w, feat(e)))))
    aligned = Experts(*(torch.stack([m[i] for m in mats]) for i in range(3)))
    w = saliency[order] / saliency[order].sum()
    merged = weighted_average(aligned, list(range(len(order))), w)
    by_member = dict(zip(order, w.tolist()))
    return Merge(merged, members, weights=[round(by_member[i], 6) for i in members])


class REAM(Method):
    name = "ream"
    statistics = frozenset({"saliency", "logit_gram", "gated_mean_outputs"})
    description = ("REAP-salient centroids take their closest experts (gated outputs + router logits); "
                   "neuron-aligned, saliency-weighted merge; centroid router rows (REAM)")

    def __init__(self, group_size: int = 16):
        if group_size < 0:
            raise MethodError(f"--group-size must be >= 0 (0: MC-SMoE's nearest-centroid rule), got {group_size}")
        self.group_size = group_size
        self._pca: tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]] | None = None  # the layer being merged's

    def settings(self) -> dict:
        return {"group_size": self.group_size}

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        clusters, centroids = pseudo_group(ream_saliency(stats), ream_distances(stats), num_out, self.group_size)
        return Grouping(clusters, centres=centroids, scores=stats.saliency)

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        if len(members) == 1:
            return Merge(Experts(*(m[centre:centre + 1] for m in experts.matrices().values())), members)
        if self._pca is None or self._pca[0]() is not experts:  # one PCA per layer, fitted at its first merge
            self._pca = (weakref.ref(experts), weight_pca(experts))  # weak: a finished layer is not kept alive
        return ream_merge(experts, members, centre, ream_saliency(stats), stats.tokens, self._pca[1])
