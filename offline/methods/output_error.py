"""How far a reduced layer's routed-expert output is from the source's, on calibration tokens.

One measure for everything that compares: the report's per-layer error and output-lsq's choice
between candidate groupings. The source output comes from the calibration statistics (the routed
output on the sampled tokens), the served one from the merged experts, routed as the export serves
them: the N router logits then the remap, or (vanilla) the kept N' rows. A layer's correction
vectors (constant experts, `--correct`) add their routing-weighted sum to the served output."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..calibration.stats import LayerStats, gate_weights
from ..moe_math import Experts, weighted_expert_sum
from .base import LayerResult


def remapped_logits(logits: torch.Tensor, result: LayerResult) -> torch.Tensor:
    """The N router logits as the remap export's router sees them: the served router never picks a
    dropped expert (its logit is -inf)."""
    dropped = torch.zeros(len(result.expert_map), dtype=torch.bool, device=logits.device)
    dropped[result.dropped] = True
    return logits.masked_fill(dropped, float("-inf")) if dropped.any() else logits


def router_weights(routing, logits: torch.Tensor, result: LayerResult) -> torch.Tensor:
    """[T, N] each router expert's routing weight as the remap export serves it (0 outside the top-k)."""
    return gate_weights(routing, remapped_logits(logits, result))


def correction_output(routing, logits: torch.Tensor, result: LayerResult) -> torch.Tensor | None:
    """[T, H] Σ_k w_k correction[i_k], what the layer's correction vectors add (None: it has none)."""
    if result.correction is None:
        return None
    return router_weights(routing, logits, result) @ result.correction.to(logits.device, torch.float32)


@torch.no_grad()
def duplicate_slot_rate(stats: LayerStats, result: LayerResult) -> float:
    """Share of the served top-k slots (remap export) that reach a merged expert another slot of the
    same token already reaches. vLLM's fused kernel computes such an expert once per slot and adds
    the weights, so this is the share of routed-expert FLOPs that folding duplicates would save."""
    _, ids = stats.routing(remapped_logits(stats.router_logits, result))
    served = torch.tensor([e or 0 for e in result.expert_map])[ids].sort(dim=-1).values
    return (served[:, 1:] == served[:, :-1]).sum().item() / max(ids.numel(), 1)


def served_weights(stats: LayerStats, result: LayerResult, export: str = "remap") -> torch.Tensor:
    """[T, N'] the weight of each merged expert on each sampled token, routed as the export serves it."""
    return served_gate_weights(stats.routing, stats.router_logits, result, export)


def served_gate_weights(routing, logits: torch.Tensor, result: LayerResult, export: str = "remap") -> torch.Tensor:
    """[T, N'] each merged expert's weight on tokens whose N router logits are `logits`, as the export serves it."""
    if export != "vanilla":  # remap and profile route over the source's N router rows
        g = router_weights(routing, logits, result)  # [T, N]; a dropped expert's column is 0
        g[:, result.constant] = 0  # a constant expert is served by its correction vector alone
        served_ids = torch.tensor([e or 0 for e in result.expert_map], device=g.device)
        return torch.zeros(len(g), len(result.experts), dtype=g.dtype, device=g.device).index_add_(1, served_ids, g)
    return gate_weights(routing, logits[:, result.representatives])


def relative_error(x: torch.Tensor, weights: torch.Tensor, experts: Experts, target: torch.Tensor) -> torch.Tensor:
    """‖Σ_j weights[:, j] E_j(x) − target‖ / ‖target‖ (differentiable: refinement minimises it)."""
    served = weighted_expert_sum(x, weights, experts)
    return torch.linalg.norm(served - target) / torch.linalg.norm(target).clamp_min(1e-30)


def experts_target(stats: LayerStats, result: LayerResult) -> torch.Tensor:
    """[T, H] what the merged experts should output: the source's routed output less the corrections."""
    corr = correction_output(stats.routing, stats.router_logits, result)
    return stats.moe_output if corr is None else stats.moe_output - corr


@torch.no_grad()
def output_error(stats: LayerStats, result: LayerResult, export: str = "remap") -> float:
    """‖served routed-expert output − source's‖ / ‖source's‖ (shared experts add the same to both)."""
    served = weighted_expert_sum(stats.tokens, served_weights(stats, result, export), result.experts)
    corr = correction_output(stats.routing, stats.router_logits, result)
    if corr is not None:
        served = served + corr
    return (torch.linalg.norm(served - stats.moe_output) / torch.linalg.norm(stats.moe_output).clamp_min(1e-30)).item()


class Measured(NamedTuple):
    """A reduced layer and what it does to the layer's output, as the report tells it (result None:
    a layer without routed experts, written as it is)."""

    result: LayerResult | None
    output_error: float | None = None
    duplicate_slots: float = 0.0
    seconds: float = 0.0  # grouping, merging and refining it


def measured(stats: LayerStats, result: LayerResult, export: str, seconds: float) -> Measured:
    """`result` with its output error on the sample and, served with remap tables, its duplicate-slot
    rate (an N'-row router, `vanilla`, serves each merged expert once per token: none)."""
    return Measured(result, output_error(stats, result, export),
                    duplicate_slot_rate(stats, result) if export != "vanilla" else 0.0, seconds)
