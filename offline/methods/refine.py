"""Layer-wise refinement: after the closed-form merge, gradient steps on every merged expert's W_G,
W_U and W_D against the source layer's routed output on the calibration sample, routing fixed.

Why: every merge rule fits each merged expert on its own (an average, or W_D by least squares with
W_G, W_U fixed). The layer's output is what matters, and it is a sum over the k experts a token
reaches: refining all merged matrices jointly against it can repair what no per-cluster rule sees.
The routing is the served one (source logits, then the remap), so it is fixed and the objective is
smooth. Each step takes a minibatch of the sample; every fifth sampled token is held out, and the
held-out error decides when to stop and which step's weights to keep (the merge itself when no step
improves on it). It needs more sampled tokens than the closed-form merges (`--output-tokens`), or
it overfits the sample within a few dozen steps.

The steps end with one sweep of exact least squares over the down projections, merged expert by
merged expert (Gauss-Seidel): W_D_j fitted to what the other merged experts leave of the source's
output on the tokens j serves. The output is linear in each W_D, so one exact solve lands where
many more gradient steps would. Kept only if the held-out error improves.

Memory: the merged experts being refined in float32 about five times (parameters, gradients, Adam's
two moments, the best step), at most `chunk_bytes` (1 GiB) of them at once: the whole layer on the
stand-ins, 6 of DeepSeek-V3's 128 merged experts at a time, written back into the merged layer
(which is then held once, and its W_D twice during the closing sweep). The held-out tokens are
every fifth, as output-lsq's grouping choice uses: the merge's own held-out error is then slightly
optimistic, which can only make refinement stop early.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.stats import LayerStats
from ..moe_math import Experts, expert_hidden, weighted_expert_sum
from .merging import least_squares_down
from .output_error import relative_error

DOWN_RIDGE = 1e-2  # the W_D sweep's ridge towards the refined W_D, relative to the mean Gram diagonal


@dataclass(frozen=True)
class Refinement:
    steps: int = 0  # at most this many optimiser steps (0: off)
    lr: float = 0.03  # Adam's step, relative to each matrix's RMS
    batch: int = 1024  # sampled tokens per step: minibatches reach what full-sample steps do, far faster
    check_every: int = 25  # held-out error measured every this many steps ...
    patience: int = 4  # ... and the run stops after this many checks without improving
    seed: int = 0
    chunk_bytes: int = 1 << 30  # float32 parameters refined at once (x5 in use with Adam's state and the best step)


def refine(experts: Experts, weights: torch.Tensor, stats: LayerStats, r: Refinement) -> tuple[Experts, dict]:
    """`experts` [N', ...] refined so that Σ_j weights[:, j] E'_j(x) approaches the source's routed output
    on the sample (`weights` [T, N']: each merged expert's served routing weight). Returns the refined
    experts in the input's dtype and the held-out error before and after.

    Merged experts whose float32 copies exceed `r.chunk_bytes` are refined a chunk at a time, the
    others' output held fixed (Adam's state is 4x the parameters: DeepSeek-V3's 128 merged experts
    at once would take ~113 GB), and each refined chunk is written back into `experts` in place;
    on the stand-ins the whole layer is one chunk (`experts` untouched)."""
    held = torch.arange(len(stats.tokens)) % 5 == 0
    x, target = stats.tokens.float(), stats.moe_output.float()
    fit = torch.nonzero(~held).flatten()

    def layer_error(e: Experts) -> float:
        with torch.no_grad():
            return relative_error(x[held], weights[held], e, target[held]).item()

    before = layer_error(experts)
    if len(fit) == 0:  # a sample of one token: nothing to fit on
        return experts, {"held_out_error_before": before, "held_out_error_after": before, "steps_run": 0,
                         "kept_merge": True}
    gen = torch.Generator().manual_seed(r.seed)
    chunks = expert_chunks(experts, r.chunk_bytes)
    if len(chunks) == 1:
        refined, steps, history = descend(experts, x, weights, target, held, fit, r, gen)
    else:  # the others' output fixed: each chunk fits what they leave of the target, written back in place
        with torch.no_grad():
            served = weighted_expert_sum(x, weights, experts)
        steps, history = 0, []
        for chunk in chunks:
            part = Experts(*(torch.stack([m[j] for j in chunk]) for m in experts.matrices().values()))
            w = weights[:, chunk]
            with torch.no_grad():
                others = served - weighted_expert_sum(x, w, part)
            new, n, h = descend(part, x, w, target - others, held, fit, r, gen)
            with torch.no_grad():
                served = others + weighted_expert_sum(x, w, new)
                for m, t in zip(experts.matrices().values(), new.matrices().values()):
                    for i, j in enumerate(chunk):
                        m[j].copy_(t[i])  # into the merged layer itself: it is never held twice
            steps, history = steps + n, history + [h]
        refined = experts
    best = layer_error(refined)
    swept = down_sweep(refined, x, weights, target, ~held)
    swept_error = layer_error(swept)
    sweep_kept = swept_error < best
    if sweep_kept:
        refined, best = swept, swept_error
    out = Experts(*(p.to(t.dtype) for p, t in zip(refined.matrices().values(), (experts.gate, experts.up, experts.down))))
    return out, {"held_out_error_before": before, "held_out_error_after": best, "steps_run": steps,
                 "kept_merge": best >= before, "held_out_errors": history,  # one per check (per chunk)
                 "down_sweep_kept": sweep_kept, "chunks": len(chunks)}


def expert_chunks(experts: Experts, budget: int) -> list[list[int]]:
    """Consecutive merged experts whose float32 matrices fit `budget` bytes together (at least one each)."""
    per = 4 * sum(m[0].numel() for m in experts.matrices().values())
    size = max(1, budget // per)
    return [list(range(a, min(a + size, len(experts)))) for a in range(0, len(experts), size)]


def descend(experts: Experts, x: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, held: torch.Tensor,
            fit: torch.Tensor, r: Refinement, gen: torch.Generator) -> tuple[Experts, int, list[float]]:
    """Minibatch Adam on all of `experts`' matrices (float32 copies) against `target`; the best step on
    the held-out tokens (or the input): (experts, steps run, held-out error per check)."""
    params = [t.detach().float().clone().requires_grad_(True) for t in (experts.gate[:], experts.up[:], experts.down[:])]
    opt = torch.optim.Adam([{"params": [p], "lr": r.lr * p.detach().pow(2).mean().sqrt().item()} for p in params])

    def held_error() -> float:
        with torch.no_grad():
            return relative_error(x[held], weights[held], Experts(*params), target[held]).item()

    best = held_error()
    best_params, since, step, history = [p.detach().clone() for p in params], 0, 0, []
    for step in range(1, r.steps + 1):
        rows = fit[torch.randint(len(fit), (min(r.batch, len(fit)),), generator=gen)]
        opt.zero_grad()
        relative_error(x[rows], weights[rows], Experts(*params), target[rows]).pow(2).backward()
        opt.step()
        if step % r.check_every == 0 or step == r.steps:  # the last step counts too
            err = held_error()
            history.append(round(err, 6))
            if err < best:
                best, best_params, since = err, [p.detach().clone() for p in params], 0
            elif (since := since + 1) >= r.patience:
                break
    return Experts(*best_params), step, history


@torch.no_grad()
def down_sweep(experts: Experts, x: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
               fit: torch.Tensor) -> Experts:
    """One Gauss-Seidel sweep over the merged experts' W_D: each refitted by ridge least squares (towards
    its current value) to target − Σ_{i≠j} weights_i E_i(x), on the `fit` tokens it serves. Holds one
    expert's activations at a time (no T x N' x I tensor) and one new W_D stack."""
    out = weighted_expert_sum(x, weights, experts)
    downs = torch.stack([experts.down[j] for j in range(len(experts))])  # the new W_D, filled expert by expert
    for j in range(len(experts)):
        rows = torch.nonzero(weights[:, j]).flatten()
        if len(rows) == 0:
            continue
        hidden = expert_hidden(x[rows], experts.gate[j].float(), experts.up[j].float()) * weights[rows, j, None]
        down = downs[j].float()
        own = hidden @ down.T
        on_fit = fit[rows]
        if on_fit.sum() < 10:
            continue
        new = least_squares_down(hidden[on_fit], (target[rows] - out[rows] + own)[on_fit], prior=down,
                                 ridge=DOWN_RIDGE)
        out[rows] += hidden @ new.T - own
        downs[j] = new
    return Experts(experts.gate, experts.up, downs)

