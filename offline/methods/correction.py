"""Correction vectors: one per router expert, added to the layer's output with that expert's
routing weight, fitted by least squares to what the merged experts leave of the source's output.

MoNE (methods/mone.py) serves a pruned expert as a constant vector, its mean output on the
tokens routed to it. The same idea holds for every router expert of a merged layer: the merge
changes what router expert i's tokens receive, and the mean of that change, weighted by i's
routing weight, is one vector the server can add back. With G [T, N] the served routing weights
of the N router experts and R [T, H] the source's routed output less the merged experts', the
corrections C [N, H] minimise ‖R − G C‖², an N x N system (8 or 64 unknowns per output dimension
against thousands of sampled tokens). The server adds G C with one gather (vllm_submoe).
"""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats
from ..moe_math import weighted_expert_sum
from .base import LayerResult
from .output_error import router_weights, served_weights

RIDGE = 1e-6  # relative to the mean diagonal of GᵀG: a router expert the sample never routes to gets 0


@torch.no_grad()
def fit_correction(stats: LayerStats, result: LayerResult) -> torch.Tensor:
    """[N, H] float32: least-squares correction vectors for `result` served with remap tables."""
    g = router_weights(stats.routing, stats.router_logits, result).double()  # [T, N]
    merged = weighted_expert_sum(stats.tokens, served_weights(stats, result), result.experts)
    residual = (stats.moe_output.double() - merged.double())  # [T, H]
    gram = g.T @ g
    gram += RIDGE * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram, g.T @ residual).float()

