"""Calibrating the source one decoder layer at a time.

Per layer: read its tensors (memory-mapped), run the calibration hidden states through it in
batches, measure routing and expert outputs, hand the layer on, and free it before the next is
read. Hidden states move on through the *source* layer, so the statistics do not depend on the
method (the quality benchmark calibrates once and compresses many times).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..moe_math import Experts, Routing, all_finite, weighted_expert_sum
from ..options import CompressError, CompressOptions
from ..source.architecture import Rotary, SourceArchitecture, attention_half
from ..source.checkpoint import LazyCheckpoint
from .activations import Activations
from .stats import ALL_STATISTICS, Accumulator, LayerStats, gate_weights


@dataclass
class CalibratedLayer:
    """One source decoder layer as read, with what calibration measured on it (experts, router and
    stats are None for a layer without routed experts: it is written as it is)."""

    index: int
    tensors: dict[str, torch.Tensor]  # non-expert tensors as stored
    experts: Experts | None  # in the stored dtype: methods upcast one expert or one cluster at a time
    router: torch.Tensor | None  # [N, H] float32
    stats: LayerStats | None
    activations: Activations | None = None  # the calibration hidden states after this layer


def _check_finite(t: torch.Tensor, what: str, layer) -> None:
    if not all_finite(t):
        raise CompressError(f"calibration produced NaN/inf {what} in layer {layer.self_attn.layer_idx}: the "
                            f"source weights are not finite there (check the checkpoint)")


@torch.no_grad()
def calibrate_batches(layer, source: Activations, target: Activations, rotary: Rotary, router: torch.Tensor | None,
                      experts: Experts | None, routing: Routing, sample: torch.Tensor, batch: int,
                      device: torch.device | str = "cpu", needs: frozenset[str] = ALL_STATISTICS) -> LayerStats | None:
    """Run the calibration windows through one source layer, `batch` windows at a time, from `source`
    into `target` (the next layer's input): routing frequency over all tokens; MoE inputs, router
    logits and the routed output on the sampled tokens (in `sample`'s order, whatever the batching). A layer without routed
    experts (router None) only moves the activations on. The statistics methods publish are
    accumulated over every token (`Accumulator`): those in `needs`."""
    windows, length, hidden = source.shape
    n = router.shape[0] if router is not None else 0
    acc = Accumulator(n, hidden, needs)
    tokens, logits_s = torch.empty(len(sample), hidden), torch.empty(len(sample), n)
    sample = sample.cpu()
    for start in range(0, windows, batch):
        stop = min(start + batch, windows)
        h = attention_half(layer, source.read(start, stop).to(device), rotary)
        moe_in = layer.post_attention_layernorm(h)
        target.write(start, h + layer.mlp(moe_in))
        if router is None:
            continue
        flat = moe_in.reshape(-1, hidden)
        logits = flat @ router.T
        _check_finite(logits, "router logits", layer)
        acc.add(flat, logits, routing, experts)
        here = torch.nonzero((sample >= start * length) & (sample < stop * length)).flatten()
        rows = (sample[here] - start * length).to(flat.device)
        tokens[here], logits_s[here] = flat[rows].cpu(), logits[rows].cpu()
    if router is None:
        return None
    routed = weighted_expert_sum(tokens.to(device), gate_weights(routing, logits_s).to(device), experts).cpu()
    stats = acc.stats(tokens, experts, logits_s, routing, windows, moe_output=routed)
    _check_finite(stats.moe_output, "expert outputs", layer)
    if stats.output_gram is not None:
        _check_finite(stats.output_gram, "expert outputs", layer)
    _check_finite(stats.tokens, "MoE inputs", layer)
    return stats


def calibrate_layer(layer, x: torch.Tensor, rotary: Rotary, router: torch.Tensor | None, experts: Experts | None,
                    routing: Routing, sample: torch.Tensor) -> tuple[LayerStats | None, torch.Tensor]:
    """`calibrate_batches` on in-memory windows x [S, L, H], all at once: (stats, the layer's output)."""
    out = Activations(tuple(x.shape))
    stats = calibrate_batches(layer, Activations(tuple(x.shape), tensor=x.float()), out, rotary, router, experts,
                              routing, sample, batch=len(x), device=x.device)
    return stats, out.tensor


def calibrated_layers(ckpt: LazyCheckpoint, windows: torch.Tensor, opts: CompressOptions, workdir: Path | None = None,
                      start: int = 0, resume: Activations | None = None,
                      needs: frozenset[str] = ALL_STATISTICS) -> Iterator[CalibratedLayer]:
    """Stream the source one decoder layer at a time: read it, run the calibration hidden states
    through it (`opts.calib_batch` windows at a time; activations over `opts.activation_memory`
    spill to files in `workdir`), yield it with its statistics. `start` > 0 continues a run from
    `resume`, the activations after layer start-1. Only the all-token statistics in `needs` are computed."""
    arch = SourceArchitecture.of(ckpt.config)
    dev, names = torch.device(opts.device), ckpt.names()
    shape = (*windows.shape, arch.config.hidden_size)

    def store(name: str) -> Activations:
        return Activations.create(shape, workdir, name, opts.activation_memory) if workdir else Activations(shape)

    x = resume
    if x is None:
        x, embed = store("x-0.f32"), ckpt.get("model.embed_tokens.weight")
        for a in range(0, len(windows), opts.calib_batch):
            x.write(a, embed[windows[a:a + opts.calib_batch]])
        del embed
    rotary = arch.rotary(windows.shape[1], device=dev)
    gen = torch.Generator().manual_seed(opts.seed)
    for l, is_moe in enumerate(arch.moe_layers()):
        sample = torch.randperm(windows.numel(), generator=gen)[: opts.output_tokens]  # drawn for every layer
        if l < start:
            continue
        tensors = {n: ckpt.get(n).clone() for n in arch.non_expert_names(names, l)}  # owned: see release()
        experts = arch.read_experts(ckpt, l, arch.num_experts, device=dev) if is_moe else None  # as stored
        router = tensors[arch.layout.router_tensor(l)].to(dev, torch.float32) if is_moe else None
        ckpt.release()
        layer = arch.build_layer(l, tensors, experts).to(dev)  # only this layer is on the device
        out = store(f"x-{(l + 1) % 2}.f32")
        routing = arch.layer_routing(l, tensors) if is_moe else arch.routing
        stats = calibrate_batches(layer, x, out, rotary, router, experts, routing, sample, opts.calib_batch, dev, needs)
        del layer
        x = out
        yield CalibratedLayer(l, tensors, experts, router, stats, activations=x)
        del tensors, experts, router, stats  # the consumer holds the layer now; the next one must not overlap it


def in_groups(layers: Iterable[CalibratedLayer], size: int) -> Iterator[list[CalibratedLayer]]:
    """Consecutive MoE layers `size` at a time; a layer without routed experts comes alone."""
    group: list[CalibratedLayer] = []
    for layer in layers:
        if layer.experts is None:
            if group:
                yield group
            group = [layer]
        else:
            group.append(layer)
        del layer  # the consumer frees a group it is done with: nothing here may keep it alive
        if len(group) == size or group[0].experts is None:
            yield group
            group = []
    if group:
        yield group
