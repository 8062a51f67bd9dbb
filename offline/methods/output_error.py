"""How far a reduced layer's routed-expert output is from the source's, on calibration tokens.

One measure for everything that compares: the report's per-layer error and output-lsq's choice
between candidate groupings. The source output comes from the calibration statistics (every
expert's output on the sampled tokens), the served one from the merged experts, routed as the
export serves them: the N router logits then the remap, or (vanilla) the kept N' rows."""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats, gate_weights
from ..moe_math import all_expert_outputs
from .base import LayerResult


@torch.no_grad()
def output_error(stats: LayerStats, result: LayerResult, export: str = "remap") -> float:
    """‖served routed-expert output − source's‖ / ‖source's‖ (shared experts add the same to both)."""
    g = stats.gate_weights().to(stats.outputs.dtype)  # [T, N]
    source = torch.einsum("tn,ntd->td", g, stats.outputs)
    merged = all_expert_outputs(stats.tokens, result.experts)  # [N', T, H]
    if export == "remap":
        dropped = torch.tensor([e is None for e in result.expert_map])
        if dropped.any():  # the served router never picks a dropped expert: its logit is -inf
            g = gate_weights(stats.routing, stats.router_logits.masked_fill(dropped, float("-inf"))).to(g.dtype)
        served = torch.einsum("tn,ntd->td", g, merged[torch.tensor([e or 0 for e in result.expert_map])])
    else:
        kept = gate_weights(stats.routing, stats.router_logits[:, result.representatives]).to(merged.dtype)
        served = torch.einsum("tn,ntd->td", kept, merged)
    return (torch.linalg.norm(served - source) / torch.linalg.norm(source).clamp_min(1e-30)).item()
