"""Sub-MoE (arXiv 2506.23266): k-means on expert outputs, then merge in a shared SVD subspace.

Per cluster and per matrix: W_cat = [W_1 … W_k] = U Σ [V_1 … V_k]ᵀ (members concatenated along
the input dimension); V̄ = Σ f_i V_i / Σ f_i; merged W = U_r Σ_r V̄_rᵀ. At full rank this is the
frequency-weighted average exactly; a rank r < full projects it onto the members' shared top-r
left singular subspace, which is the method's knob.

Variants: `adaptive` clusters each pair of adjacent layers jointly (one grouping for both,
from their concatenated output features); Sub-MoE† (`intra_rank_ratio`) then truncates every
merged matrix to a low rank with SVD-LLM whitening by the routed tokens' inputs. Sub-MoE† is
written as dense weights (vLLM's fused-MoE kernel has no factored form), so it saves memory
only once served as factors: the report says so and gives the truncation error.
"""
from __future__ import annotations

import numpy as np
import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts, expert_hidden
from .base import Grouping, Merge, MethodError, WeightMerge
from .clustering import kmeans_clusters, output_features
from .merging import merge_weights, routed_tokens, weighted_sum


def subspace_merge(mats: torch.Tensor, weights: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, float]:
    """mats [k, out, in], weights [k] summing to 1 -> (merged [out, in], relative truncation error)."""
    k, n_out, n_in = mats.shape
    cat = mats.double().permute(1, 0, 2).reshape(n_out, k * n_in)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    m = S.shape[0]
    r = m if rank is None else max(1, min(rank, m))
    V_blocks = Vh.reshape(m, k, n_in)
    V_merged = torch.einsum("k,mkn->mn", weights.double(), V_blocks)
    full = (U * S) @ V_merged
    merged = (U[:, :r] * S[:r]) @ V_merged[:r]
    err = (torch.linalg.norm(full - merged) / torch.linalg.norm(full).clamp_min(1e-30)).item()
    return merged.to(mats.dtype), err


class SubMoE(WeightMerge):
    name = "submoe"
    statistics = frozenset({"output_gram"})
    description = "k-means on expert-output cosine similarity; joint-SVD subspace merge, frequency-weighted V"

    def __init__(self, rank: int | None = None, rank_ratio: float | None = None, adaptive: bool = False,
                 intra_rank_ratio: float | None = None, align_neurons: bool = False):
        super().__init__(align_neurons)
        if rank is not None and rank < 1:
            raise MethodError(f"--rank must be at least 1, got {rank}")
        if rank_ratio is not None and not 0 < rank_ratio <= 1:
            raise MethodError(f"--rank-ratio must be in (0, 1], got {rank_ratio}")
        if rank is not None and rank_ratio is not None:
            raise MethodError("give --rank or --rank-ratio, not both")
        if intra_rank_ratio is not None and not 0 < intra_rank_ratio < 1:
            raise MethodError(f"--intra-rank-ratio must be in (0, 1), got {intra_rank_ratio}")
        self.rank, self.rank_ratio = rank, rank_ratio
        self.adaptive, self.intra_rank_ratio = adaptive, intra_rank_ratio
        self.joint_layers = 2 if adaptive else 1

    def settings(self) -> dict:
        out = {"rank": self.rank, "rank_ratio": self.rank_ratio or (None if self.rank else 1.0),
               "adaptive": self.adaptive, **super().settings()}
        if self.intra_rank_ratio is not None:
            out["intra_rank_ratio"] = self.intra_rank_ratio
            out["note"] = ("Sub-MoE†: merged matrices are low rank but written dense; memory shrinks only "
                           "when served as factors, which vLLM's fused-MoE kernel does not support yet")
        return out

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        return Grouping(kmeans_clusters(output_features(stats.output_gram), num_out, seed))

    def group_jointly(self, stats: list[LayerStats], num_out: int, seed: int) -> Grouping:
        """Adaptive: one k-means over the layers' concatenated output features."""
        joint = np.concatenate([output_features(s.output_gram) for s in stats], axis=1) / np.sqrt(len(stats))
        return Grouping(kmeans_clusters(joint, num_out, seed))

    def rank_for(self, n_out: int, n_in_total: int) -> int | None:
        full = min(n_out, n_in_total)
        if self.rank is not None:
            return min(self.rank, full)
        if self.rank_ratio is not None:
            return max(1, round(self.rank_ratio * full))
        return None

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        w = merge_weights(stats.frequency, members)
        merged, ranks, errors = {}, {}, {}
        for which, mats in experts.matrices().items():
            sub = mats[members].float()  # one cluster upcast, not the layer
            full = min(sub.shape[1], len(members) * sub.shape[2])
            rank = self.rank_for(sub.shape[1], len(members) * sub.shape[2])
            if rank is None or rank >= full:
                # Full rank is exactly the weighted average (tested identity): skip the SVD,
                # which for Mixtral-size experts costs minutes and a GB per matrix.
                merged[which], errors[which] = weighted_sum(sub, w), 0.0
            else:
                merged[which], errors[which] = subspace_merge(sub, w, rank)
            ranks[which] = full if rank is None else min(rank, full)
        out = Merge(None, members, weights=[round(x, 6) for x in w.tolist()], rank=ranks, truncation_error=errors)
        if self.intra_rank_ratio is not None:
            merged, out.intra_rank, out.intra_error = self.intra_expert_low_rank(merged, routed_tokens(stats, members))
        out.expert = Experts(**{k: v.unsqueeze(0) for k, v in merged.items()})
        return out

    def intra_expert_low_rank(self, merged: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[dict, dict, dict]:
        """Sub-MoE†: whitened truncation of W_G, W_U (inputs: routed tokens) and W_D (inputs: the
        merged expert's own activations on them). Returns (matrices, ranks, relative errors)."""
        hidden = expert_hidden(x, merged["gate"], merged["up"])
        out, ranks, errors = {}, {}, {}
        for which, w in merged.items():
            inputs = hidden if which == "down" else x
            ranks[which] = max(1, round(self.intra_rank_ratio * min(w.shape)))
            out[which], errors[which] = whitened_low_rank(w, inputs, ranks[which])
        return out, ranks, errors


def whitened_low_rank(w: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """SVD-LLM truncation of w [out, in] for inputs x [T, in]: the rank-r W' minimising ‖(W − W')xᵀ‖.

    With S the Cholesky factor of xᵀx (damped so it exists with few tokens), truncating the SVD of
    W S and multiplying back by S⁻¹ is optimal in the input-weighted norm. Returns W' and the
    relative output error ‖(W − W')xᵀ‖ / ‖W xᵀ‖ on those inputs."""
    wd, xd = w.double(), x.double()
    gram = xd.T @ xd
    gram += torch.eye(len(gram), dtype=gram.dtype) * (1e-6 * gram.diagonal().mean().clamp_min(1e-12))
    s = torch.linalg.cholesky(gram)
    U, S, Vh = torch.linalg.svd(wd @ s, full_matrices=False)
    low = (U[:, :rank] * S[:rank]) @ torch.linalg.solve_triangular(s, Vh[:rank], upper=False, left=False)
    err = torch.linalg.norm((wd - low) @ xd.T) / torch.linalg.norm(wd @ xd.T).clamp_min(1e-30)
    return low.to(w.dtype), err.item()
