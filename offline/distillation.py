"""End-to-end distillation of a written checkpoint's merged experts (`submoe compress --distill-steps S`).

Every per-layer step (merge, refinement, corrections) fits a layer's output on the source's own
hidden states; the errors of early layers then reach later ones, and what the model predicts is
never the objective. This pass is: the merged experts of every layer (and the correction
vectors) take Adam steps on KL(source ‖ compressed) of the next-token distributions, on the
calibration windows, everything else frozen and the routing the served one (the source's router
rows, then the remap). Every fifth window is held out; its KL, checked every `check_every`
steps, decides when to stop and which step's weights to keep (the written ones when none
improves). The updated experts are written back into the checkpoint's shards.

The student is transformers' model of the checkpoint (evaluate.load_reference) with each MoE
layer's experts module replaced by the N' merged experts behind the remap (`RemappedExperts`), so
a merged expert shared by several router experts is one set of parameters. It runs the whole model
in float32 on the calibration device: meant for models that fit there (the stand-ins, small MoEs).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from submoe_format.checkpoint import correction_tensor, merged_count, parse_block

from .evaluate import load_reference
from .moe_math import Experts, weighted_expert_sum
from .source.architecture import SourceArchitecture
from .source.checkpoint import LazyCheckpoint


@dataclass(frozen=True)
class Distillation:
    steps: int = 0  # at most this many optimiser steps (0: off)
    lr: float = 0.001  # Adam's step, relative to each tensor's RMS (0.003 and 0.01 overshoot after refinement)
    batch: int = 4  # calibration windows per step
    windows: int = 256  # of the calibration windows, at most this many (the source's distributions are kept)
    check_every: int = 25
    patience: int = 4
    seed: int = 0


class RemappedExperts(torch.nn.Module):
    """transformers' experts module interface (hidden [T, H], top-k router ids and weights) over N'
    merged experts: router expert i computes with merged expert `expert_map[i]`; a constant or dropped
    one with none (its weight goes to the correction, or it is never chosen)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, expert_map: list[int | None]):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Parameter(t.float().clone()) for t in (gate, up, down))
        self.register_buffer("slot", torch.tensor([-1 if e is None else e for e in expert_map]))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        slots = self.slot[top_k_index]  # [T, k]; -1: no merged expert
        token, pos = torch.nonzero(slots >= 0, as_tuple=True)
        weights = torch.zeros(len(hidden_states), len(self.gate), device=hidden_states.device)  # [T, N']
        weights.index_put_((token, slots[token, pos]), top_k_weights[token, pos].float(), accumulate=True)
        out = weighted_expert_sum(hidden_states, weights, Experts(self.gate, self.up, self.down))
        return out.to(hidden_states.dtype)


def student(out_dir: Path) -> tuple[torch.nn.Module, dict[int, RemappedExperts], dict[int, torch.Tensor]]:
    """The checkpoint's reference model with trainable merged experts (and correction vectors)."""
    model = load_reference(str(out_dir))
    ckpt = LazyCheckpoint(out_dir)
    block, arch = parse_block(ckpt.config), SourceArchitecture.of(ckpt.config)
    experts, corrections = {}, {}
    for l, m in enumerate(block.expert_maps):
        if m is None:
            continue
        merged = arch.read_experts(ckpt, l, merged_count(m))
        experts[l] = RemappedExperts(*(torch.stack(list(t)) for t in (merged.gate, merged.up, merged.down)), list(m))
        model.model.layers[l].mlp.experts = experts[l]
    for l, layer in enumerate(model.model.layers):  # the vectors evaluate.add_correction's hooks add
        if hasattr(layer.mlp, "submoe_correction"):
            layer.mlp.submoe_correction = corrections[l] = layer.mlp.submoe_correction.float().clone()
    return model, experts, corrections


def distill(out_dir: Path, source_dir: Path, windows: torch.Tensor, d: Distillation) -> dict:
    """Distil `out_dir`'s merged experts towards `source_dir` on `windows` [S, L]; rewrite them in
    place. Returns the held-out KL before and after, steps taken, and seconds."""
    t0 = time.time()
    windows = windows[:d.windows]
    teacher = load_reference(str(source_dir))
    model, experts, corrections = student(out_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for e in experts.values() for p in e.parameters()] + list(corrections.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": [p], "lr": d.lr * p.detach().pow(2).mean().sqrt().clamp_min(1e-8).item()}
                            for p in params])
    held = torch.arange(len(windows)) % 5 == 0
    with torch.no_grad():  # the source's distributions, once (float32 [S, L, V]: 268 MB for 64 x 256 x 4096)
        target = torch.cat([teacher(input_ids=w).logits.float().log_softmax(-1) for w in windows.split(d.batch)])
    del teacher
    train = torch.nonzero(~held).flatten()

    def held_out_kl() -> float:
        with torch.no_grad():
            return sum(kl(model(input_ids=windows[rows]).logits, target[rows], reduction="sum")
                       for rows in torch.nonzero(held).flatten().split(d.batch)).item() / windows[held].numel()

    best_kl = start_kl = held_out_kl()
    best = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(d.seed)
    checks_without_gain = steps = 0
    for steps in range(1, d.steps + 1):
        rows = train[torch.randint(len(train), (d.batch,), generator=gen)]
        loss = kl(model(input_ids=windows[rows]).logits, target[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps % d.check_every == 0 or steps == d.steps:  # and after the last step
            now = held_out_kl()
            if now < best_kl:
                best_kl, best, checks_without_gain = now, [p.detach().clone() for p in params], 0
            else:
                checks_without_gain += 1
                if checks_without_gain >= d.patience:
                    break
    with torch.no_grad():
        for p, b in zip(params, best):
            p.copy_(b)
    if best_kl < start_kl:
        write_back(out_dir, experts, corrections)
    return {"steps": steps, "held_out_kl_before": round(start_kl, 6), "held_out_kl_after": round(best_kl, 6),
            "windows": len(windows), "held_out_windows": int(held.sum()), "seconds": round(time.time() - t0, 2)}


def kl(student_logits: torch.Tensor, target_logp: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(target ‖ student) per token (mean, or summed over tokens)."""
    per_token = F.kl_div(student_logits.float().log_softmax(-1), target_logp, log_target=True,
                         reduction="none").sum(-1)
    return per_token.mean() if reduction == "mean" else per_token.sum()


def write_back(out_dir: Path, experts: dict[int, RemappedExperts], corrections: dict[int, torch.Tensor]) -> None:
    """Replace the merged experts' and corrections' tensors in the checkpoint's shards (stored dtype kept)."""
    arch = SourceArchitecture.of(json.loads((out_dir / "config.json").read_text()))
    new = {correction_tensor(l): c.detach() for l, c in corrections.items()}
    for l, e in experts.items():
        for j in range(len(e.gate)):
            for which, t in (("gate", e.gate), ("up", e.up), ("down", e.down)):
                new[arch.layout.expert_tensor(l, j, which)] = t[j].detach()
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names, metadata = list(h.keys()), h.metadata()
            if not set(names) & set(new):
                continue
            tensors = {n: h.get_tensor(n) for n in names}
        tensors.update({n: new[n].to(tensors[n].dtype) for n in names if n in new})
        tmp = f.with_name(f.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(f)
