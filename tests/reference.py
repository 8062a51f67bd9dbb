"""Test-only references: the dense, all-at-once forms of what the compressor computes in a stream,
for tests to compare the streamed results with."""
from __future__ import annotations

import torch

from offline.calibration.activations import Activations
from offline.calibration.layers import calibrate_batches
from offline.calibration.stats import Accumulator, LayerStats
from offline.moe_math import Experts, Routing, as_routing, expert_forward
from offline.source.architecture import Rotary


def moe_forward(x: torch.Tensor, router: torch.Tensor, experts: Experts, routing: Routing | int,
                expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse MoE output (routed experts) for tokens x [T, H]; `expert_map` remaps router ids to merged experts."""
    weights, ids = as_routing(routing)(x @ router.T)
    if expert_map is not None:
        ids = expert_map[ids]
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in ids.unique().tolist():
        rows, slot = torch.where(ids == e)
        y = expert_forward(x[rows], experts.gate[e], experts.up[e], experts.down[e])
        out.index_add_(0, rows, (y * weights[rows, slot, None]).float())
    return out.to(x.dtype)


def stats_from_sample(tokens: torch.Tensor, experts: Experts, router_logits: torch.Tensor, routing: Routing,
                      samples: int = 0) -> LayerStats:
    """Statistics of a layer whose calibration tokens are exactly `tokens`."""
    acc = Accumulator(router_logits.shape[1], tokens.shape[1])
    acc.add(tokens, router_logits, routing, experts)
    return acc.stats(tokens, experts, router_logits, routing, samples)


def calibrate_layer(layer, x: torch.Tensor, rotary: Rotary, router: torch.Tensor | None, experts: Experts | None,
                    routing: Routing, sample: torch.Tensor) -> tuple[LayerStats | None, torch.Tensor]:
    """`calibrate_batches` on in-memory windows x [S, L, H], all at once: (stats, the layer's output)."""
    out = Activations(tuple(x.shape))
    stats = calibrate_batches(layer, Activations(tuple(x.shape), tensor=x.float()), out, rotary, router, experts,
                              routing, sample, batch=len(x), device=x.device)
    return stats, out.tensor
