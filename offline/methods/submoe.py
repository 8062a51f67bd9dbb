"""Sub-MoE (arXiv 2506.23266): k-means on expert outputs, then merge in a shared SVD subspace.

Per cluster and per matrix: W_cat = [W_1 … W_k] = U Σ [V_1 … V_k]ᵀ (members concatenated along
the input dimension); V̄ = Σ f_i V_i / Σ f_i; merged W = U_r Σ_r V̄_rᵀ. At full rank this is the
frequency-weighted average exactly; a rank r < full projects it onto the members' shared top-r
left singular subspace, which is the method's knob.
"""
from __future__ import annotations

import torch

from ..clustering import kmeans_clusters, output_features
from ..moe_math import Experts
from .base import ExpertReducer, LayerStats, MethodError, merge_weights


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


class SubMoE(ExpertReducer):
    name = "submoe"
    description = "k-means on expert-output cosine similarity; joint-SVD subspace merge, frequency-weighted V"

    def __init__(self, rank: int | None = None, rank_ratio: float | None = None):
        if rank is not None and rank < 1:
            raise MethodError(f"--rank must be at least 1, got {rank}")
        if rank_ratio is not None and not 0 < rank_ratio <= 1:
            raise MethodError(f"--rank-ratio must be in (0, 1], got {rank_ratio}")
        if rank is not None and rank_ratio is not None:
            raise MethodError("give --rank or --rank-ratio, not both")
        self.rank, self.rank_ratio = rank, rank_ratio

    def settings(self) -> dict:
        return {"rank": self.rank, "rank_ratio": self.rank_ratio or (None if self.rank else 1.0)}

    def group(self, stats: LayerStats, num_out: int, seed: int) -> list[list[int]]:
        return kmeans_clusters(output_features(stats.outputs), num_out, seed)

    def rank_for(self, n_out: int, n_in_total: int) -> int | None:
        full = min(n_out, n_in_total)
        if self.rank is not None:
            return min(self.rank, full)
        if self.rank_ratio is not None:
            return max(1, round(self.rank_ratio * full))
        return None

    def merge(self, experts: Experts, members: list[int], stats: LayerStats) -> tuple[Experts, dict]:
        w = merge_weights(stats.frequency, members)
        merged, info = {}, {"members": members, "weights": [round(x, 6) for x in w.tolist()]}
        for which, mats in experts.matrices().items():
            sub = mats[members]
            full = min(sub.shape[1], len(members) * sub.shape[2])
            rank = self.rank_for(sub.shape[1], len(members) * sub.shape[2])
            if rank is None or rank >= full:
                # Full rank is exactly the weighted average (tested identity): skip the SVD,
                # which for Mixtral-size experts costs minutes and a GB per matrix.
                merged[which], err = torch.einsum("k,kij->ij", w.to(sub.dtype), sub), 0.0
            else:
                merged[which], err = subspace_merge(sub, w, rank)
            info[f"{which}_rank"] = full if rank is None else min(rank, full)
            info[f"{which}_truncation_error"] = err
        return Experts(**{k: v.unsqueeze(0) for k, v in merged.items()}), info
