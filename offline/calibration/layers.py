"""Calibrating the source one decoder layer at a time.

Per layer: read its tensors (memory-mapped), run the calibration hidden states through it in
batches, measure routing and expert outputs, hand the layer on, and free it before the next is
read. Hidden states move on through the *source* layer, so the statistics do not depend on the
method (the quality benchmark calibrates once and compresses many times).

Sequential (error-compensating) calibration instead calibrates layer l on the hidden states the
*compressed* layers before it produce, and sets the routed experts' target to what would bring
the layer's output back to the *source model's* hidden state there: a source stream runs beside
the compressed one, and once the consumer has merged layer l, `advance_compressed` moves the
compressed stream on through the merged layer. Such statistics depend on the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..moe_math import Experts, Routing, all_finite, weighted_expert_sum
from ..source.architecture import Rotary, SourceArchitecture, attention_half
from ..source.checkpoint import LazyCheckpoint
from .activations import Activations
from .settings import Calibration, CalibrationError
from .stats import ALL_STATISTICS, Accumulator, LayerStats, gate_weights

# A resumable run's hidden states after its last finished layer (and, sequential, the source's)
RESUME, RESUME_SOURCE = "resume.f32", "resume-source.f32"


@dataclass
class Sequential:
    """Sequential calibration's state after a layer: the source model's hidden states there, and
    what `advance_compressed` needs to move the compressed stream through the merged layer."""

    source_activations: Activations
    inputs: Activations  # the layer's input on the compressed stream
    module: torch.nn.Module
    rotary: Rotary
    batch: int


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
    sequential: Sequential | None = None


def save_resume_point(layer: CalibratedLayer, directory: Path) -> None:
    """Keep the hidden states after `layer`: a run killed from here on resumes after it."""
    if layer.activations is not None:
        layer.activations.save_as(directory / RESUME)
    if layer.sequential is not None:
        layer.sequential.source_activations.save_as(directory / RESUME_SOURCE)


def resume_point(directory: Path, shape: tuple[int, int, int], sequential: bool) -> tuple[Activations, Activations | None]:
    """The hidden states `save_resume_point` kept: the compressed (or only) stream, and the source's."""
    source = Activations(shape, path=directory / RESUME_SOURCE) if sequential else None
    return Activations(shape, path=directory / RESUME), source


def _check_finite(t: torch.Tensor, what: str, layer) -> None:
    if not all_finite(t):
        raise CalibrationError(f"calibration produced NaN/inf {what} in layer {layer.self_attn.layer_idx}: the "
                            f"source weights are not finite there (check the checkpoint)")


@torch.no_grad()
def calibrate_batches(layer, source: Activations, target: Activations, rotary: Rotary, router: torch.Tensor | None,
                      experts: Experts | None, routing: Routing, sample: torch.Tensor, batch: int,
                      device: torch.device | str = "cpu", needs: frozenset[str] = ALL_STATISTICS,
                      source_next: Activations | None = None) -> LayerStats | None:
    """Run the calibration windows through one source layer, `batch` windows at a time, from `source`
    into `target` (the next layer's input): routing frequency over all tokens; MoE inputs, router
    logits and the routed output on the sampled tokens (in `sample`'s order, whatever the batching). A layer without routed
    experts (router None) only moves the activations on. The statistics methods publish are
    accumulated over every token (`Accumulator`): those in `needs`. With `source_next` (sequential
    calibration: the source model's hidden states after this layer) the routed output's target on the
    sample is what brings this layer's output to those, not the source experts' own output."""
    windows, length, hidden = source.shape
    n = router.shape[0] if router is not None else 0
    acc = Accumulator(n, hidden, needs)
    tokens, logits_s = torch.empty(len(sample), hidden), torch.empty(len(sample), n)
    short = torch.zeros(len(sample), hidden)  # sequential: source hidden state − this layer's output
    sample = sample.cpu()
    for start in range(0, windows, batch):
        stop = min(start + batch, windows)
        h = attention_half(layer, source.read(start, stop).to(device), rotary)
        moe_in = layer.post_attention_layernorm(h)
        new = h + layer.mlp(moe_in)
        target.write(start, new)
        if router is None:
            continue
        flat = moe_in.reshape(-1, hidden)
        logits = flat @ router.T
        _check_finite(logits, "router logits", layer)
        acc.add(flat, logits, routing, experts)
        here = torch.nonzero((sample >= start * length) & (sample < stop * length)).flatten()
        rows = (sample[here] - start * length).to(flat.device)
        tokens[here], logits_s[here] = flat[rows].cpu(), logits[rows].cpu()
        if source_next is not None:
            short[here] = (source_next.read(start, stop).to(device).reshape(-1, hidden)[rows]
                           - new.reshape(-1, hidden)[rows]).cpu()
    if router is None:
        return None
    routed = weighted_expert_sum(tokens.to(device), gate_weights(routing, logits_s).to(device), experts).cpu()
    stats = acc.stats(tokens, experts, logits_s, routing, windows,
                      moe_output=routed + short if source_next is not None else routed)
    _check_finite(stats.moe_output, "expert outputs", layer)
    if stats.output_gram is not None:
        _check_finite(stats.output_gram, "expert outputs", layer)
    _check_finite(stats.tokens, "MoE inputs", layer)
    return stats


def calibrated_layers(ckpt: LazyCheckpoint, windows: torch.Tensor, opts: Calibration, workdir: Path | None = None,
                      start: int = 0, resume: Activations | None = None,
                      needs: frozenset[str] = ALL_STATISTICS, sequential: bool = False,
                      resume_source: Activations | None = None) -> Iterator[CalibratedLayer]:
    """Stream the source one decoder layer at a time: read it, run the calibration hidden states
    through it (`opts.calib_batch` windows at a time; activations over `opts.activation_memory`
    spill to files in `workdir`), yield it with its statistics. `start` > 0 continues a run from
    `resume`, the activations after layer start-1. Only the all-token statistics in `needs` are computed.
    `sequential`: a source stream runs beside (`resume_source` continues it), and the consumer must call
    `advance_compressed` on each MoE layer before asking for the next."""
    arch = SourceArchitecture.of(ckpt.config)
    dev, names = torch.device(opts.device), ckpt.names()
    shape = (*windows.shape, arch.config.hidden_size)

    def store(name: str) -> Activations:
        return Activations.create(shape, workdir, name, opts.activation_memory) if workdir else Activations(shape)

    x, x_src = resume, resume_source
    if x is None:
        x, embed = store("x-0.f32"), ckpt.get("model.embed_tokens.weight")
        x_src = store("s-0.f32") if sequential else None
        for a in range(0, len(windows), opts.calib_batch):
            for stream in (x, x_src) if sequential else (x,):
                stream.write(a, embed[windows[a:a + opts.calib_batch]])
        del embed
    rotary = arch.rotary(windows.shape[1], device=dev)
    gen = torch.Generator().manual_seed(opts.seed)
    for l, is_moe in enumerate(arch.moe_layers()):
        sample = torch.randperm(windows.numel(), generator=gen)[: opts.output_tokens]  # drawn for every layer
        if l < start:
            continue
        tensors, experts, router = read_layer(ckpt, arch, names, l, is_moe, dev)
        layer = arch.build_layer(l, tensors, experts).to(dev)  # only this layer is on the device
        out = store(f"x-{(l + 1) % 2}.f32")
        routing = arch.layer_routing(l, tensors) if is_moe else arch.routing
        source_next = None
        if sequential:  # the source model's own hidden states move on beside the compressed ones
            source_next = store(f"s-{(l + 1) % 2}.f32")
            calibrate_batches(layer, x_src, source_next, rotary, None, None, routing, sample, opts.calib_batch, dev)
        stats = calibrate_batches(layer, x, out, rotary, router, experts, routing, sample, opts.calib_batch, dev, needs,
                                  source_next=source_next)
        seq = Sequential(source_next, inputs=x, module=layer, rotary=rotary, batch=opts.calib_batch) if sequential \
            else None
        del layer
        x, x_src = out, source_next
        yield CalibratedLayer(l, tensors, experts, router, stats, activations=x, sequential=seq)
        del tensors, experts, router, stats, seq  # the consumer holds the layer now; the next one must not overlap it


def read_layer(ckpt: LazyCheckpoint, arch: SourceArchitecture, names: list[str], l: int, is_moe: bool,
               device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], Experts | None, torch.Tensor | None]:
    """One decoder layer as read: its non-expert tensors (owned copies, see `LazyCheckpoint.release`),
    its experts as stored (views on the CPU) and its router in float32; the files are released after."""
    tensors = {n: ckpt.get(n).clone() for n in arch.non_expert_names(names, l)}
    experts = arch.read_experts(ckpt, l, arch.num_experts, device=device) if is_moe else None
    router = tensors[arch.layout.router_tensor(l)].to(device, torch.float32) if is_moe else None
    ckpt.release()
    return tensors, experts, router


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


@torch.no_grad()
def advance_compressed(layer: CalibratedLayer, served: Callable[[torch.Tensor], torch.Tensor],
                       merged: Experts) -> None:
    """Sequential calibration: rewrite `layer.activations` (the source layer's output on the compressed
    stream) as the merged layer's, by swapping the routed experts' output: `served(logits)` gives each
    merged expert's weight per token [T, N'] from the N router logits, as the export serves them."""
    seq, dev = layer.sequential, layer.router.device
    module = seq.module
    windows, length, hidden = seq.inputs.shape
    for start in range(0, windows, seq.batch):
        stop = min(start + seq.batch, windows)
        h = attention_half(module, seq.inputs.read(start, stop).to(dev), seq.rotary)
        flat = module.post_attention_layernorm(h).reshape(-1, hidden)
        logits = flat @ layer.router.T
        delta = (weighted_expert_sum(flat, served(logits).to(dev), merged)
                 - weighted_expert_sum(flat, gate_weights(layer.stats.routing, logits), layer.experts))
        layer.activations.write(start, layer.activations.read(start, stop).to(dev) + delta.view(stop - start, length, hidden))
