"""Named settings for `submoe compress`: the recommended default and the trade-offs users ask for.

Chosen from the committed benchmarks at equal treatment: every merging method was also measured
with the same 16k sampled tokens and the same refinement (benchmarks/results/quality.json, mean
KL at 50% of the experts on the three stand-ins, 3 seeds; method_cost.json for the cost). The
refinement is what closes most of the gap between methods; output-lsq's merge under it leads on
the from-scratch and fine-grained stand-ins and ties M-SMoE and MergeMoE on the upcycled one, so it
is the default. The figures quoted here are those files' (tests/test_first_use.py checks them).
"""
from __future__ import annotations

from dataclasses import dataclass

STAND_INS = ("upcycled 8->4", "from-scratch 8->4", "fine-grained 64->32")


@dataclass(frozen=True)
class Preset:
    settings: dict  # CompressOptions fields
    purpose: str
    label: str  # its configuration in the benchmarks' results
    kl: tuple[float, float, float]  # mean KL at 50% of the experts on STAND_INS
    compress_seconds: int  # one `submoe compress` of the upcycled stand-in 8->4, calibration included

    def help(self) -> str:
        kl = "/".join(f"{k:.3f}" for k in self.kl)
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in self.settings.items())
        return (f"{options}: {self.purpose}; mean KL {kl} at 50%% of the experts on the three stand-ins, "
                f"{self.compress_seconds} s to compress the shipped one")


PRESETS = {
    "quality": Preset(
        {"method": "output-lsq", "output_tokens": 16384, "refine_steps": 100},
        "the best measured: output-lsq's grouping and least-squares merge, then layer-wise refinement",
        "output-lsq+refine@16k", (0.066, 0.044, 0.004), 35),
    "fast": Preset(
        {"method": "reap"},
        "REAP as published: prunes by saliency, no pass of every expert over every token and no refinement",
        "reap", (0.167, 0.198, 0.072), 8),
    "stock": Preset(
        {"method": "output-lsq", "output_tokens": 16384, "refine_steps": 100, "export": "vanilla"},
        "the quality preset written as a stock checkpoint (N'-row router) that tools without the plugin load",
        "output-lsq+refine+vanilla@16k", (0.091, 0.055, 0.010), 35),
}
DEFAULT = "quality"
