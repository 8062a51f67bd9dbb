"""What calibration measures on one MoE layer: the statistics every method works from.

Two kinds. Statistics a method publishes are accumulated over *every* calibration token as the
layer streams past: routing frequency, REAP's saliency, each expert's mean output (HC-SMoE) and
mean gate-weighted output (REAM), the moments of each expert's output over the tokens routed to
it (MoNE, MAN/MSAN), and two N x N Gram matrices, of the experts' outputs (output similarity: Sub-MoE's grouping) and of
the router logits (M-SMoE's). A seeded token sample keeps per-token MoE inputs, router logits and
the source's routed output, for what needs them token by token (least squares, held-out errors);
an expert's outputs on the sample are recomputed from the source experts when a method asks for
them, so no [N, T, H] tensor of every expert's outputs is ever held (15 GB at DeepSeek-V3's shape).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..moe_math import Experts, Routing, all_expert_outputs, as_routing, expert_forward, weighted_expert_sum


@dataclass
class LayerStats:
    frequency: torch.Tensor  # [N] share of top-k selections per router expert (sums to 1), all tokens
    tokens: torch.Tensor  # [T, H] sampled MoE inputs
    router_logits: torch.Tensor  # [T, N] on the sampled tokens
    experts: Experts  # the source experts, for their outputs on the sample (`expert_outputs`)
    moe_output: torch.Tensor | None = None  # [T, H] the source's routed output Σ_n g_tn E_n(x_t) on the sample
    mean_outputs: torch.Tensor | None = None  # [N, H] each expert's mean output over all tokens
    gated_mean_outputs: torch.Tensor | None = None  # [N, H] mean over all tokens of p_n(x) E_n(x) (REAM)
    output_gram: torch.Tensor | None = None  # [N, N] Σ_t <E_i(x_t), E_j(x_t)> over all tokens
    logit_gram: torch.Tensor | None = None  # [N, N] Σ_t l_ti l_tj over all tokens
    saliency: torch.Tensor | None = None  # [N] REAP: mean over routed tokens of p_j(x) ‖E_j(x)‖
    # "routed_outputs": over the tokens routed to expert j (j in the top-k), all calibration tokens
    routed_mean: torch.Tensor | None = None  # [N, H] mean of E_j(x) (MoNE's constant)
    routed_var: torch.Tensor | None = None  # [N, H] its population variance per dimension
    routed_norm: torch.Tensor | None = None  # [N] mean ‖E_j(x)‖ (MAN)
    routed_gate: torch.Tensor | None = None  # [N] mean over all tokens of the routing weight of j (0 if not chosen)
    top_k: int = 2
    samples: int = 0  # calibration windows behind the figures (MergeMoE's collapse threshold)
    routing: Routing | None = None  # the source architecture's routing; None: Mixtral's with top_k

    def __post_init__(self):
        self.routing = as_routing(self.routing or self.top_k)
        self.top_k = self.routing.top_k
        if self.moe_output is None:
            self.moe_output = weighted_expert_sum(self.tokens, self.gate_weights(), self.experts)

    def gate_weights(self) -> torch.Tensor:
        """[T, N] the source routing weight of every expert on every sampled token (0 if not in its top-k)."""
        return gate_weights(self.routing, self.router_logits)

    def expert_outputs(self, members: list[int]) -> torch.Tensor:
        """[k, T, H] float32: the members' outputs on the sampled tokens, computed now."""
        return all_expert_outputs(self.tokens, self.experts, members)

    def subset(self, rows: torch.Tensor) -> "LayerStats":
        """The same layer's statistics with a subset of the sampled tokens (all-token figures unchanged)."""
        return replace(self, tokens=self.tokens[rows], router_logits=self.router_logits[rows],
                       moe_output=self.moe_output[rows])


def gate_weights(routing: Routing, router_logits: torch.Tensor) -> torch.Tensor:
    """[T, N] routing weight of each of the N logits' experts per token (0 outside its top-k)."""
    w, ids = routing(router_logits)
    return torch.zeros(router_logits.shape, dtype=w.dtype, device=w.device).scatter_(1, ids, w)


ALL_STATISTICS = frozenset({"output_gram", "mean_outputs", "gated_mean_outputs", "logit_gram", "saliency",
                            "routed_outputs"})
EVERY_EXPERT = frozenset({"output_gram", "mean_outputs", "gated_mean_outputs"})  # every expert on every token
ROUTED = frozenset({"saliency", "routed_outputs"})  # each expert on its routed tokens
FIELDS = {"routed_outputs": ("routed_mean", "routed_var", "routed_norm", "routed_gate")}  # LayerStats fields


def statistic_fields(names) -> list[str]:
    """The LayerStats fields that hold the statistics `names`."""
    return [f for n in sorted(names) for f in FIELDS.get(n, (n,))]


class Accumulator:
    """The all-token statistics of one layer, summed batch by batch (float64; nothing per token kept).
    Only those in `needs` are computed (the others stay None): every expert on every token, for
    the output Gram matrix and mean outputs, costs N/k times the layer's own forward; REAP's
    saliency needs each expert on its routed tokens only."""

    def __init__(self, num_experts: int, hidden: int, needs: frozenset[str] = ALL_STATISTICS,
                 chunk_bytes: int = 4 << 30):
        n, f64 = num_experts, torch.float64
        self.needs = needs
        # Every expert's float64 outputs on a chunk of 256 tokens at a time (fewer only past `chunk_bytes`).
        # Each chunk reads and upcasts every expert's weights once, so the chunk must not shrink with the
        # shape: a DeepSeek-V3 layer (21 GB of experts, 14 MiB of outputs per token) streams from disk
        # once per 256 tokens (3.8 GB of outputs); a smaller budget would re-read it every few tokens.
        self.chunk = max(1, min(256, chunk_bytes // (8 * max(1, n) * hidden)))
        self.selections = torch.zeros(n, dtype=f64)
        self.output_sum, self.output_gram = torch.zeros(n, hidden, dtype=f64), torch.zeros(n, n, dtype=f64)
        self.gated_sum = torch.zeros(n, hidden, dtype=f64)
        self.logit_gram = torch.zeros(n, n, dtype=f64)
        self.saliency_sum, self.routed = torch.zeros(n, dtype=f64), torch.zeros(n, dtype=f64)
        self.routed_sum, self.routed_sq = torch.zeros(n, hidden, dtype=f64), torch.zeros(n, hidden, dtype=f64)
        self.routed_norm_sum, self.gate_sum = torch.zeros(n, dtype=f64), torch.zeros(n, dtype=f64)
        self.count = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, logits: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
        """Add a batch of MoE inputs x [T, H] with their router logits [T, N]; returns the top-k ids."""
        w, ids = routing(logits)
        self.selections += torch.bincount(ids.flatten().cpu(), minlength=len(self.selections)).double()
        if "routed_outputs" in self.needs:
            self.gate_sum.index_add_(0, ids.flatten().cpu(), w.flatten().double().cpu())
        lg = logits.double()
        if "logit_gram" in self.needs:
            self.logit_gram += (lg.T @ lg).cpu()
        probs = routing.scores(lg)  # REAP's gate: the raw scores over all experts (softmax, or V3's sigmoid)
        routed = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, ids, True)
        if self.needs & EVERY_EXPERT:
            self._every_expert(x, probs, routed, experts)
        elif self.needs & ROUTED:
            for e in torch.nonzero(routed.any(0)).flatten().tolist():  # each expert on its routed tokens only
                rows = torch.nonzero(routed[:, e]).flatten()
                y = expert_forward(x[rows], *experts.expert(e)).double()
                self._routed(y.unsqueeze(0), probs[rows, e:e + 1].T, slice(e, e + 1))
        self.routed += routed.sum(0).double().cpu()
        self.count += len(x)
        return ids

    def _every_expert(self, x: torch.Tensor, probs: torch.Tensor, routed: torch.Tensor, experts: Experts) -> None:
        for start in range(0, len(x), self.chunk):  # every expert on a chunk of tokens at a time
            rows = slice(start, start + self.chunk)
            xs = x[rows]
            y = torch.empty(len(experts), len(xs), x.shape[1], dtype=torch.float64, device=x.device)  # [N, c, H]
            for e in range(len(experts)):
                y[e] = expert_forward(xs, *experts.expert(e))
            self.output_sum += y.sum(1).cpu()
            if "gated_mean_outputs" in self.needs:
                self.gated_sum += torch.einsum("tn,nth->nh", probs[rows], y).cpu()
            flat = y.reshape(len(y), -1)
            self.output_gram += (flat @ flat.T).cpu()
            self._routed(y, (probs[rows] * routed[rows]).T, slice(None), routed[rows].T.double())

    def _routed(self, y: torch.Tensor, gate: torch.Tensor, experts, mask: torch.Tensor | None = None) -> None:
        """Add experts' outputs y [n, c, H] on c tokens, of which `mask` [n, c] (None: all) are routed
        to each, with their REAP gate [n, c] (0 where not routed)."""
        norms = torch.linalg.vector_norm(y, dim=-1)  # [n, c]
        self.saliency_sum[experts] += (gate * norms).sum(1).cpu()
        if "routed_outputs" in self.needs:
            m = torch.ones_like(norms) if mask is None else mask
            self.routed_sum[experts] += torch.einsum("nc,nch->nh", m, y).cpu()
            self.routed_sq[experts] += torch.einsum("nc,nch->nh", m, y * y).cpu()
            self.routed_norm_sum[experts] += (m * norms).sum(1).cpu()

    def stats(self, tokens: torch.Tensor, experts: Experts, router_logits: torch.Tensor, routing: Routing,
              samples: int, moe_output: torch.Tensor | None = None) -> LayerStats:
        return LayerStats(frequency=self.selections / self.selections.sum(), tokens=tokens, experts=experts,
                          router_logits=router_logits, moe_output=moe_output,
                          mean_outputs=(self.output_sum / max(self.count, 1)).float() if "mean_outputs" in self.needs else None,
                          gated_mean_outputs=(self.gated_sum / max(self.count, 1)).float()
                          if "gated_mean_outputs" in self.needs else None,
                          output_gram=self.output_gram if "output_gram" in self.needs else None,
                          logit_gram=self.logit_gram if "logit_gram" in self.needs else None,
                          saliency=torch.where(self.routed > 0, self.saliency_sum / self.routed.clamp_min(1), 0.0)
                          if "saliency" in self.needs else None,
                          **(self._routed_moments() if "routed_outputs" in self.needs else {}),
                          samples=samples, routing=routing)

    def _routed_moments(self) -> dict[str, torch.Tensor]:
        """Per expert, over its routed tokens: mean and variance of its output, mean norm; and its mean
        routing weight over all tokens. An expert never routed to has zeros."""
        count = self.routed.clamp_min(1).unsqueeze(1)
        mean = self.routed_sum / count
        return {"routed_mean": mean.float(), "routed_var": (self.routed_sq / count - mean * mean).clamp_min(0).float(),
                "routed_norm": self.routed_norm_sum / count.squeeze(1), "routed_gate": self.gate_sum / max(self.count, 1)}
