"""`submoe compress`: the pipeline, top to bottom.

    options   what was asked, checked against the source and the method before anything is read (options.py)
    source    the checkpoint, memory-mapped, and its architecture (source/)
    calibrate one decoder layer at a time: run the calibration hidden states through it and
              measure routing and expert outputs, or read what `submoe calibrate` measured (calibration/)
    reduce    group each layer's experts and merge every group, then refine and correct if asked (methods/)
    write     a layer at a time (shards of at most 2 GiB), then config.json with the remap tables,
              tokenizer and report, in a work directory that survives a killed run and resumes it (writing/)
    distil    if asked, the written checkpoint's merged experts trained end to end on the source's
              next-token distributions (distillation.py)

With `--choose-end-to-end` the source is calibrated once, the reduce-write steps run once per
candidate fit of W_D, and the candidate closer to the source end to end is kept (choice.py),
before distilling.

Hidden states move on through the *source* layer, so the statistics do not depend on the method:
`submoe calibrate` writes them once and `compress --stats DIR` reads them instead of calibrating,
for any method and ratio. `--sequential` instead moves them on through each merged layer.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from .calibration.layer_source import LayerSource
from .calibration.layers import CalibratedLayer, advance_compressed, in_groups
from .calibration.windows import windows_of
from .choice import compress_choosing
from .distillation import Distillation, distill
from .methods import LayerResult, Method, make_method, reduce_layers
from .methods.correction import fit_correction
from .methods.output_error import Measured, experts_target, measured, served_gate_weights, served_weights
from .methods.refine import Refinement, refine
from .options import CompressError, CompressOptions, layer_budgets
from .source.architecture import SourceArchitecture
from .source.checkpoint import LazyCheckpoint
from .writing.output import CompressedOutput
from .writing.report import peak_rss_bytes
from .writing.report import write as write_report
from .writing.workdir import resumable_output_dir


def compress(opts: CompressOptions) -> dict:
    """Compress `opts.model` into `opts.out`; returns the compression report."""
    started = time.time()
    report = compress_choosing(opts, lambda o: reduce_and_write(o, time.time())) if opts.choose_end_to_end \
        else reduce_and_write(opts, started)
    if opts.distill_steps:
        source = LazyCheckpoint(opts.model)
        report["distillation"] = distill(Path(opts.out), source.dir, windows_of(source, report["calibration"]),
                                         Distillation(steps=opts.distill_steps, seed=opts.seed))
        # the run's time and peak memory are the whole run's, the distillation included
        report.update(time_seconds=round(time.time() - started, 2), peak_rss_bytes=peak_rss_bytes())
        write_report(report, Path(opts.out))
    return report


def reduce_and_write(opts: CompressOptions, started: float) -> dict:
    """Calibrate, reduce and write, a layer at a time; returns the compression report."""
    source = LazyCheckpoint(opts.model)
    arch = SourceArchitecture.of(source.config)
    method = make_method(opts.method, **opts.method_options)
    budgets = layer_budgets(opts, source, arch, method)
    layers = LayerSource(source, arch, opts, method.statistics, opts.stats, opts.sequential, opts.method)
    with resumable_output_dir(opts.out, opts.force, opts.fingerprint(), opts.restart, protect=source.dir) as work:
        out = CompressedOutput(work, source, arch, opts, started)
        for group in in_groups(out.clock.timed(layers.after(out.layers_done, work.dir)), method.joint_layers):
            reduced = reduce_group(group, method, budgets, opts)
            if opts.sequential and reduced[0].result is not None:
                with out.clock.calibrating():  # the compressed stream moves on through the merged layer
                    advance(group[0], reduced[0].result, opts.export)
            out.add(group, reduced)
            del group  # the next layer must not be read while this one is alive
        return out.finish(method, layers.info)


def reduce_group(group: list[CalibratedLayer], method: Method, budgets: list[int | None],
                 opts: CompressOptions) -> list[Measured]:
    """Merge one group of calibrated layers (refining each if asked); a layer without routed
    experts is written as it is."""
    if group[0].experts is None:
        return [Measured(None)]
    t0 = time.time()
    on_cpu = [c.experts.to("cpu") for c in group]  # methods run on the CPU; their outputs come from these experts
    stats = [replace(c.stats, experts=e) for c, e in zip(group, on_cpu)]
    results = reduce_layers(method, list(zip(on_cpu, stats)), [budgets[c.index] for c in group], opts.seed)
    if opts.correct:  # before refining, which then fits what the corrections leave, and again after it
        results = [corrected(s, r) for s, r in zip(stats, results)]
    if opts.refine_steps:
        results = [refined(s, r, opts) for s, r in zip(stats, results)]
        if opts.correct:
            results = [corrected(s, r) for s, r in zip(stats, results)]
    seconds = (time.time() - t0) / len(group)
    return [measured(c.stats, r, opts.export, seconds) for c, r in zip(group, results)]


def refined(stats, result: LayerResult, opts: CompressOptions) -> LayerResult:
    """The layer's merged experts after layer-wise refinement, routed as the export serves them,
    towards what the layer's corrections leave of the source's output."""
    experts, info = refine(result.experts, served_weights(stats, result, opts.export),
                           replace(stats, moe_output=experts_target(stats, result)),
                           Refinement(steps=opts.refine_steps, seed=opts.seed))
    return replace(result, experts=experts, refinement=info)


def corrected(stats, result: LayerResult) -> LayerResult:
    """The layer with least-squares correction vectors for every router expert (methods/correction.py)."""
    return replace(result, correction=fit_correction(stats, result))


def advance(layer: CalibratedLayer, result: LayerResult, export: str) -> None:
    """Sequential calibration: the compressed stream after `layer` becomes the merged layer's output."""
    advance_compressed(layer, lambda logits: served_gate_weights(layer.stats.routing, logits, result, export),
                       result.experts.to(layer.router.device))


__all__ = ["CompressOptions", "CompressError", "compress", "reduce_group"]
