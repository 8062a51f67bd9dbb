"""What calibration measures on one MoE layer: the statistics every method works from."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moe_math import Routing, as_routing


@dataclass
class LayerStats:
    """Routing frequency over all calibration tokens; MoE inputs, router logits and every expert's
    output on a seeded token sample."""

    frequency: torch.Tensor  # [N] share of top-k selections per router expert (sums to 1)
    tokens: torch.Tensor  # [T, H] sampled MoE inputs
    outputs: torch.Tensor  # [N, T, H] every expert's output on those tokens
    router_logits: torch.Tensor  # [T, N] on the sampled tokens
    top_k: int = 2
    samples: int = 0  # calibration windows behind the figures (MergeMoE's collapse threshold)
    routing: Routing | None = None  # the source architecture's routing; None: Mixtral's with top_k

    def __post_init__(self):
        self.routing = as_routing(self.routing or self.top_k)
        self.top_k = self.routing.top_k

    def gate_weights(self) -> torch.Tensor:
        """[T, N] the source routing weight of every expert on every sampled token (0 if not in its top-k)."""
        return gate_weights(self.routing, self.router_logits)

    def subset(self, rows: torch.Tensor) -> "LayerStats":
        """The same layer's statistics on a subset of the sampled tokens (frequency stays the full figure)."""
        return LayerStats(self.frequency, self.tokens[rows], self.outputs[:, rows], self.router_logits[rows],
                          self.top_k, self.samples, self.routing)


def gate_weights(routing: Routing, router_logits: torch.Tensor) -> torch.Tensor:
    """[T, N] routing weight of each of the N logits' experts per token (0 outside its top-k)."""
    w, ids = routing(router_logits)
    return torch.zeros(router_logits.shape, dtype=w.dtype).scatter_(1, ids, w)
