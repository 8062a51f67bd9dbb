"""Neuron alignment before a weight merge (M-SMoE's permutation matching).

An expert's intermediate neurons can be permuted freely — rows of W_G and W_U and columns of W_D
together — without changing what it computes. Two experts trained from independent starts hold
similar neurons in different positions, so averaging them position by position mixes unrelated
neurons. Matching each member's neurons to the centre's (a linear assignment maximising the
summed similarity of the neurons' weights) lines them up first.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..moe_math import Experts, ExpertStack


def neuron_features(experts: Experts, e: int) -> torch.Tensor:
    """[I, 2H + H] one row per intermediate neuron: its W_G row, W_U row and W_D column."""
    return torch.cat([experts.gate[e], experts.up[e], experts.down[e].T], dim=1).double()


def neuron_permutation(centre: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """perm such that member neuron perm[j] is matched to centre neuron j (max total dot product)."""
    _, cols = linear_sum_assignment((centre @ member.T).numpy(), maximize=True)
    return torch.from_numpy(cols)


def permute_neurons(experts: Experts, e: int, perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return experts.gate[e][perm], experts.up[e][perm], experts.down[e][:, perm]


def align_to(experts: Experts, members: list[int], centre: int) -> Experts:
    """`experts` with every member's neurons permuted to match the centre's: the members are
    permuted copies, every other expert stays a view (no copy of the layer per cluster)."""
    ref = neuron_features(experts, centre)
    mats = {which: [m[e] for e in range(len(experts))] for which, m in experts.matrices().items()}
    for e in members:
        if e != centre:
            permuted = permute_neurons(experts, e, neuron_permutation(ref, neuron_features(experts, e)))
            for which, t in zip(mats, permuted):
                mats[which][e] = t
    return Experts(*(ExpertStack(m) for m in mats.values()))
