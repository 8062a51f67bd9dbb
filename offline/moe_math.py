"""The MoE block as small pure tensor functions (SwiGLU experts, softmax top-k routing, remap)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


class ExpertStack:
    """N per-expert matrices left where they are (views into memory-mapped safetensors files),
    indexed like a stacked [N, ...] tensor: an int gives one expert's matrix (a view, nothing
    read), a list, a tensor of ids or a slice stacks those experts (a copy of one cluster, never of
    the layer). A source layer larger than memory (DeepSeek-V3's is 22.5 GB in bf16) is used without
    ever being copied whole; the kernel pages it in and out as the file's pages are touched."""

    def __init__(self, mats: list[torch.Tensor]):
        self.mats = mats

    def __len__(self) -> int:
        return len(self.mats)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.mats), *self.mats[0].shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.mats[0].dtype

    @property
    def device(self) -> torch.device:
        return self.mats[0].device

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return self.mats[idx]
        ids = range(len(self.mats))[idx] if isinstance(idx, slice) else torch.as_tensor(idx).flatten().tolist()
        return torch.stack([self.mats[i] for i in ids])

    def new_empty(self, *shape) -> torch.Tensor:
        return self.mats[0].new_empty(*shape)

    def to(self, *args, **kwargs) -> "ExpertStack":
        return ExpertStack([m.to(*args, **kwargs) for m in self.mats])


Stack = torch.Tensor | ExpertStack


@dataclass
class Experts:
    """A layer's experts: gate W_G [E, I, H] (w1), up W_U [E, I, H] (w3), down W_D [E, H, I] (w2),
    each a stacked tensor or an `ExpertStack` of per-expert views (a source layer as stored).

    `gate_up` optionally holds W_G and W_U as one [E, 2I, H] tensor of which `gate` and `up` are
    views: transformers' fused expert parameter."""

    gate: Stack
    up: Stack
    down: Stack
    gate_up: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def fused(cls, gate_up: torch.Tensor, down: torch.Tensor) -> "Experts":
        inter = gate_up.shape[1] // 2
        return cls(gate_up[:, :inter], gate_up[:, inter:], down, gate_up)

    def __len__(self) -> int:
        return self.gate.shape[0]

    def to(self, *args, **kwargs) -> "Experts":
        """Like Tensor.to (dtype and/or device), for all three matrices (fused ones stay fused, views
        stay views when nothing changes)."""
        if self.gate_up is not None:
            return Experts.fused(self.gate_up.to(*args, **kwargs), self.down.to(*args, **kwargs))
        return Experts(self.gate.to(*args, **kwargs), self.up.to(*args, **kwargs), self.down.to(*args, **kwargs))

    @classmethod
    def empty(cls, n: int, like: "Experts") -> "Experts":
        """`n` uninitialised experts with `like`'s matrix shapes, dtype and device (fused)."""
        inter, hidden = like.gate.shape[1:]
        return cls.fused(like.gate.new_empty(n, 2 * inter, hidden), like.down.new_empty(n, *like.down.shape[1:]))

    def fused_gate_up(self) -> torch.Tensor:
        """[E, 2I, H]: W_G rows then W_U rows (no copy when the experts were read fused)."""
        return self.gate_up if self.gate_up is not None else torch.cat([self.gate, self.up], dim=1)

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's (W_G, W_U, W_D) in float32: experts held in their stored dtype are upcast one at a time."""
        return self.gate[e].float(), self.up[e].float(), self.down[e].float()

    def matrices(self) -> dict[str, Stack]:
        return {"gate": self.gate, "up": self.up, "down": self.down}


def all_finite(t: Stack) -> bool:
    """No NaN or inf in `t`, without `torch.isfinite`'s full-size temporaries (a GB for one
    Mixtral expert stack): aminmax propagates NaN, and an inf is always an extreme."""
    if isinstance(t, ExpertStack):
        return all(all_finite(m) for m in t.mats)
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def expert_hidden(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activations silu(x W_Gᵀ) * (x W_Uᵀ): [T, H] -> [T, I]."""
    return F.silu(x @ gate.T) * (x @ up.T)


def expert_forward(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return expert_hidden(x, gate, up) @ down.T


def all_expert_outputs(x: torch.Tensor, experts: Experts, members: list[int] | None = None) -> torch.Tensor:
    """Every expert (or those in `members`) applied to every token: [E, T, H] float32."""
    return torch.stack([expert_forward(x, *experts.expert(e)) for e in (range(len(experts)) if members is None else members)])


def weighted_expert_sum(x: torch.Tensor, weights: torch.Tensor, experts: Experts,
                        members: list[int] | None = None) -> torch.Tensor:
    """Σ_e weights[:, e] · E_e(x) for tokens x [T, H] and weights [T, E]: a routed MoE output, float32
    (with `members`, column i weighs expert members[i]). Each expert runs only on the tokens it
    weighs, one at a time: nothing of size E x T x H exists."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for col in torch.nonzero((weights != 0).any(0)).flatten().tolist():
        rows = torch.nonzero(weights[:, col]).flatten()
        e = col if members is None else members[col]
        matrices = (m.to(x.dtype) for m in experts.expert(e))  # bf16 experts on float32 tokens: one at a time
        out.index_add_(0, rows, expert_forward(x[rows], *matrices) * weights[rows, col, None])
    return out


@dataclass(frozen=True)
class Routing:
    """How a source architecture turns N router logits into k (weight, expert) pairs per token,
    before any remap: scores over all N (softmax, or DeepSeek-V3's sigmoid); the layer's
    score-correction `bias` added for choosing experts only; optionally only within the best
    `topk_groups` of `num_groups` equal expert groups (a group scores its best expert: DeepSeek-V2's
    group_limited_greedy, or its best two with a bias: V3's noaux_tc); top-k; the k unbiased
    scores are the weights, optionally renormalised; scaled. vLLM's grouped_topk, step by step."""

    top_k: int
    renormalize: bool = True
    num_groups: int = 1
    topk_groups: int = 1
    scaling: float = 1.0
    scoring: str = "softmax"
    bias: torch.Tensor | None = field(default=None, compare=False, repr=False)  # [N], one per layer

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The gate's score of every expert, in float32 or better (REAP weighs outputs by these)."""
        x = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32))
        if self.scoring == "sigmoid":
            return x.sigmoid()
        if self.scoring == "softmax":
            return torch.softmax(x, dim=-1)
        raise ValueError(f"unsupported scoring function {self.scoring!r} (softmax or sigmoid)")

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(router_logits)
        choice = scores if self.bias is None else scores + self.bias.to(scores.device)
        if self.num_groups > 1:
            grouped = choice.view(*choice.shape[:-1], self.num_groups, -1)
            group_score = grouped.amax(-1) if self.bias is None else grouped.topk(2, dim=-1).values.sum(-1)
            best = group_score.topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(-1, best, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)
        ids = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.scaling, ids

    def for_layer(self, bias: torch.Tensor | None) -> "Routing":
        """This routing with one layer's score-correction bias (families without one pass None)."""
        return self if bias is None else replace(self, bias=bias.float())


def as_routing(routing: Routing | int) -> Routing:
    """A bare top-k means Mixtral's routing."""
    return routing if isinstance(routing, Routing) else Routing(routing)
