"""Merging a cluster's weights: the weighted averages every weight-merging method starts from,
and the least-squares down projection two of them fit on calibration outputs."""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts
from .base import Merge


def merge_weights(frequency: torch.Tensor, members: list[int]) -> torch.Tensor:
    """Normalised frequency weights; a cluster that calibration never routed to averages uniformly."""
    f = frequency[members].double()
    return f / f.sum() if f.sum() > 0 else torch.full_like(f, 1.0 / len(members))


def weighted_sum(mats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w_k mats[k] for mats [k, out, in] (one cluster, as stored), in float32."""
    return torch.einsum("k,kij->ij", weights.float(), mats.float())


def weighted_average(experts: Experts, members: list[int], weights: torch.Tensor,
                     block_bytes: int = 1 << 30) -> Experts:
    """Σ w_i W_i for each of W_G, W_U, W_D (leading dim 1), a block of rows at a time within
    `block_bytes` of float32 copies: a cluster of 100 DeepSeek-V3 experts at once takes 6 GB a matrix."""
    def one(m: torch.Tensor) -> torch.Tensor:
        step = max(1, block_bytes // (4 * len(members) * m.shape[2]))
        return torch.cat([weighted_sum(torch.stack([m[i][a:a + step] for i in members]), weights)
                          for a in range(0, m.shape[1], step)])
    return Experts(*(one(m).unsqueeze(0) for m in experts.matrices().values()))


def frequency_weighted(experts: Experts, members: list[int], stats: LayerStats) -> Merge:
    """Σ f_i W_i / Σ f_i for each of W_G, W_U, W_D (HC-SMoE, M-SMoE; the start of MergeMoE's and ours)."""
    w = merge_weights(stats.frequency, members)
    return Merge(weighted_average(experts, members, w), members, weights=[round(x, 6) for x in w.tolist()])


def uniform_average(experts: Experts, members: list[int]) -> Merge:
    return Merge(weighted_average(experts, members, torch.full((len(members),), 1.0 / len(members))), members)


def least_squares_down(hidden: torch.Tensor, target: torch.Tensor, prior: torch.Tensor | None = None,
                       ridge: float = 0.0) -> torch.Tensor:
    """W [H, I] minimising ‖target − hidden Wᵀ‖² (+ ridge·tr(hᵀh)/I · ‖W − prior‖²), in fp64.

    hidden [T, I], target [T, H]. Without ridge it is the minimum-norm solution Y P⁺."""
    if ridge == 0:
        return torch.linalg.lstsq(hidden.double(), target.double(), driver="gelsd").solution.T.to(hidden.dtype)
    return ridge_fits(hidden, target, prior, (ridge,))[ridge]


def ridge_fits(hidden: torch.Tensor, target: torch.Tensor, prior: torch.Tensor,
               ridges: tuple[float, ...]) -> dict[float, torch.Tensor]:
    """`least_squares_down` for each ridge > 0, the Gram matrix and Pᵀy computed once for all."""
    p, y = hidden.double(), target.double()
    gram, pty, prior64 = p.T @ p, p.T @ y, prior.double().T
    eye, scale = torch.eye(len(gram), dtype=gram.dtype), gram.diagonal().mean().clamp_min(1e-12)
    return {r: torch.linalg.solve(gram + (r * scale) * eye, pty + (r * scale) * prior64).T.to(hidden.dtype)
            for r in ridges}


def with_down(merge: Merge, down: torch.Tensor, **figures) -> Merge:
    """`merge` with its W_D replaced (W_G, W_U kept) and the fit's figures added."""
    e = merge.expert
    merge.expert = Experts(e.gate, e.up, down.unsqueeze(0))
    for k, v in figures.items():
        setattr(merge, k, v)
    return merge


def routed_mask(stats: LayerStats, members: list[int]) -> torch.Tensor:
    """[T] bool: sampled tokens whose top-k includes at least one member (where the merged expert acts)."""
    return stats.gate_weights()[:, members].sum(1) > 0


def routed_tokens(stats: LayerStats, members: list[int]) -> torch.Tensor:
    """Tokens routed to the cluster; all sampled tokens if calibration routed none there."""
    mask = routed_mask(stats, members)
    return stats.tokens[mask] if mask.any() else stats.tokens
