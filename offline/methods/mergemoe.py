"""MergeMoE (arXiv 2510.14436): frequency-centred groups, least-squares down projection.

MergeMoE: the most frequently routed experts are the centres; every other expert joins the centre
whose concatenated [W_U ‖ W_G] is most cosine-similar. W_G and W_U of a cluster are the
frequency-weighted averages (the paper's T2, T3); the down projection is solved by least squares
on calibration outputs: with P the merged expert's activations on the sampled tokens and Y the
frequency-weighted sum of the members' outputs, W_D = Y P⁺ (fp64 here). The paper writes this as
T1 = Q P⁺ with Q the members' concatenated activations and W_D = [f_1 W_D1 … f_k W_Dk] T1; since
[f_1 W_D1 …] Q = Y, both are the same matrix. It collapses with too few samples (the paper: below
~32-36 sequences), so it warns there.
"""
from __future__ import annotations

import warnings

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts, expert_hidden
from .base import Grouping, Merge, WeightMerge
from .clustering import assign_to_centres, cosine_from_gram
from .merging import frequency_weighted, least_squares_down, merge_weights, with_down

PAPER_MIN_SAMPLES = 36


class CalibrationWarning(UserWarning):
    """Calibration too small for a least-squares method to be trusted."""


def weight_similarity(experts: Experts, chunk: int = 1 << 16) -> torch.Tensor:
    """[N, N] cosine similarity of the experts' flattened [W_U ‖ W_G], from their Gram matrix summed
    over column chunks: no float64 copy of the layer (4x a bf16 layer), and experts held as views
    are read a chunk at a time."""
    g = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for m in (experts.up, experts.gate):
        flat = [m[e].flatten() for e in range(len(experts))]
        for start in range(0, len(flat[0]), chunk):
            c = torch.stack([f[start:start + chunk] for f in flat]).double()
            g += c @ c.T
    return cosine_from_gram(g)


def warn_if_underdetermined(method: str, stats: LayerStats, tokens: int, intermediate: int) -> bool:
    problems = []
    if 0 < stats.samples < PAPER_MIN_SAMPLES:
        problems.append(f"{stats.samples} calibration samples, below the {PAPER_MIN_SAMPLES} under which "
                        f"MergeMoE's paper reports collapse")
    if tokens < intermediate:
        problems.append(f"{tokens} tokens for {intermediate} unknowns per output row (underdetermined)")
    if problems:
        warnings.warn(f"{method}: least squares on too little calibration: {'; '.join(problems)}. "
                      f"Raise --samples / --output-tokens.", CalibrationWarning, stacklevel=2)
    return bool(problems)


class MergeMoE(WeightMerge):
    name = "mergemoe"
    statistics = frozenset()
    description = ("most frequent experts as centres, others join by [W_U||W_G] similarity; frequency-weighted "
                   "W_G, W_U; least-squares W_D on calibration outputs")

    def group(self, stats: LayerStats, num_out: int, seed: int, experts: Experts) -> Grouping:
        return Grouping(assign_to_centres(stats.frequency, weight_similarity(experts), num_out))

    def merge(self, experts: Experts, members: list[int], centre: int, stats: LayerStats) -> Merge:
        avg = frequency_weighted(experts, members, stats)  # W_G, W_U stay the weighted averages
        if len(members) == 1:
            return avg
        x = stats.tokens.to(avg.expert.gate.dtype)
        w = merge_weights(stats.frequency, members)
        target = torch.einsum("k,ktd->td", w.float(), stats.expert_outputs(members))
        under = warn_if_underdetermined(self.name, stats, len(x), avg.expert.gate.shape[1])
        down = least_squares_down(expert_hidden(x, avg.expert.gate[0], avg.expert.up[0]), target)
        return with_down(avg, down, least_squares_tokens=len(x), underdetermined=under)
