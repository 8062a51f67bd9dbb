"""`submoe compress`: the pipeline, top to bottom.

    options   what was asked, checked against the source before anything is read (options.py)
    source    the checkpoint, memory-mapped, and its architecture (source/)
    calibrate one decoder layer at a time: run the calibration hidden states through it and
              measure routing and expert outputs (calibration/)
    reduce    group each layer's experts and merge every group (methods/)
    write     a layer at a time (shards of at most 2 GiB), then config.json with the remap tables,
              tokenizer and report, in a work directory that survives a killed run and resumes it (writing/)

Hidden states move on through the *source* layer, so the statistics do not depend on the method:
`submoe calibrate` writes them once (calibration/stats_file.py) and `compress --stats DIR` reads
them instead of calibrating, for any method and ratio (the quality benchmark works that way).
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from tqdm import tqdm

from .calibration.activations import Activations
from .calibration.layers import CalibratedLayer, advance_compressed, calibrated_layers, in_groups
from .calibration.stats_file import StatsFile, stats_layers
from .calibration.windows import source_windows
from .methods import LayerResult, Method, make_method, reduce_layers
from .methods.output_error import output_error, served_gate_weights, served_weights
from .methods.refine import Refinement, refine
from .options import CompressError, CompressOptions, layer_budgets
from .source.architecture import SourceArchitecture
from .source.checkpoint import LazyCheckpoint
from .writing.output import CompressedOutput
from .writing.report import rss_bytes
from .writing.workdir import resumable_output_dir


def compress(opts: CompressOptions) -> dict:
    """Compress `opts.model` into `opts.out`; returns the compression report."""
    t0 = time.time()
    source = LazyCheckpoint(opts.model)
    arch = SourceArchitecture.of(source.config)
    method = make_method(opts.method, **opts.method_options)
    budgets = layer_budgets(opts, source.config, arch, drops=method.drops_experts)
    if opts.sequential and method.joint_layers > 1:
        raise CompressError("--sequential merges a layer before calibrating the next, --adaptive groups adjacent "
                            "layers jointly: drop one")
    if not source.has_tokenizer():
        raise CompressError(f"{source.dir} has no tokenizer.json / tokenizer_config.json: calibration text "
                            f"cannot be tokenized, and the output could not be served")
    stats = StatsFile(opts.stats) if opts.stats else None
    if stats:
        stats.check(source, method.statistics, opts.method)
        opts, calib_info = stats.applied_to(opts), stats.calibration
    else:
        windows, calib_info = source_windows(source, opts.calib, opts.samples, opts.seq_len, opts.seed)
    rss_floor = rss_bytes()  # what no layer adds to: libraries, tokenizer, calibration tokens

    with resumable_output_dir(opts.out, opts.force, opts.fingerprint(), opts.restart, protect=source.dir) as work:
        out = CompressedOutput(work.dir, source, arch, opts, work.state)
        done, resume_file, earlier = out.layers_done, work.dir / "resume.f32", work.state.get("seconds", 0)
        resume_source = work.dir / "resume-source.f32"  # sequential calibration's source stream
        # reading each layer and running the calibration through it, earlier runs of a resumed one included
        calibration = {"seconds": work.state.get("calibration_seconds", 0.0)}
        if stats:
            layers = timed(stats_layers(source, stats, start=done), calibration)
        else:
            shape = (*windows.shape, arch.config.hidden_size)
            resume = Activations(shape, path=resume_file) if done else None
            resume_src = Activations(shape, path=resume_source) if done and opts.sequential else None
            layers = timed(calibrated_layers(source, windows, opts, work.dir, start=done, resume=resume,
                                             needs=method.statistics, sequential=opts.sequential,
                                             resume_source=resume_src), calibration)
        bar = tqdm(total=len(budgets), initial=done, unit="layer", disable=not opts.progress,
                   desc=f"compress {opts.method} {arch.num_experts}->{opts.num_experts}")
        if done:
            bar.write(f"resuming {opts.out} after its first {done} finished layers", file=sys.stderr)
        for group in in_groups(layers, method.joint_layers):
            results = reduce_and_write(group, method, budgets, opts, out)
            if opts.sequential and results[0] is not None:  # the compressed stream moves on through the merge
                t_advance = time.time()
                advance(group[0], results[0], opts.export)
                calibration["seconds"] += time.time() - t_advance  # calibration work: counted as such
            if group[-1].activations is not None:  # a kill from here on resumes after this group
                group[-1].activations.save_as(resume_file)
            if group[-1].source_activations is not None:
                group[-1].source_activations.save_as(resume_source)
            work.save(**out.state(), seconds=earlier + time.time() - t0, calibration_seconds=calibration["seconds"])
            bar.update(len(group))
            del group  # the next layer must not be read while this one is alive
        bar.close()
        # seconds: this run's reading and calibrating (with --stats, reading; the calibration's own time is
        # the statistics file's, kept as calibrate_seconds)
        calib_info = {**calib_info, "seconds": round(calibration["seconds"], 2)}
        if stats:
            calib_info.update(statistics_file=str(opts.stats), calibrate_seconds=stats.calibration["seconds"])
        return out.finish(method, calib_info,
                          earlier + time.time() - t0, rss_floor)


def timed(items, clock: dict):
    """`items`, adding the time spent producing each to clock["seconds"]."""
    it = iter(items)
    while True:
        t0 = time.time()
        try:
            item = next(it)
        except StopIteration:
            return
        clock["seconds"] += time.time() - t0
        yield item
        del item  # a finished layer must not stay alive while the next one is read


def reduce_and_write(group: list[CalibratedLayer], method: Method, budgets: list[int | None], opts: CompressOptions,
                     out: CompressedOutput) -> list[LayerResult | None]:
    reduced = reduce_group(group, method, budgets, opts)
    for layer, (result, error, seconds) in zip(group, reduced):
        out.add(layer, result, error, seconds)
    return [r for r, _, _ in reduced]


def advance(layer: CalibratedLayer, result: LayerResult, export: str) -> None:
    """Sequential calibration: the compressed stream after `layer` becomes the merged layer's output."""
    dev = layer.router.device
    advance_compressed(layer, lambda logits: served_gate_weights(layer.stats.routing, logits, result, export),
                       result.experts.to(dev))


def reduce_group(group: list[CalibratedLayer], method: Method, budgets: list[int | None],
                 opts: CompressOptions) -> list[tuple[LayerResult | None, float | None, float]]:
    """Merge one group of calibrated layers: per layer (result, its output error, seconds); None for
    a layer without routed experts (written as it is)."""
    if group[0].experts is None:
        return [(None, None, 0.0)]
    t0 = time.time()
    on_cpu = [c.experts.to("cpu") for c in group]  # methods run on the CPU; their outputs come from these experts
    results = reduce_layers(method, [(e, replace(c.stats, experts=e)) for e, c in zip(on_cpu, group)],
                            [budgets[c.index] for c in group], opts.seed)
    if opts.refine_steps:
        results = [refined(r, replace(c.stats, experts=e), opts) for r, c, e in zip(results, group, on_cpu)]
    seconds = (time.time() - t0) / len(group)
    return [(r, output_error(c.stats, r, opts.export), seconds) for c, r in zip(group, results)]


def refined(result: LayerResult, stats, opts: CompressOptions) -> LayerResult:
    """The layer's merged experts after layer-wise refinement, routed as the export serves them."""
    experts, info = refine(result.experts, served_weights(stats, result, opts.export), stats,
                           Refinement(steps=opts.refine_steps, seed=opts.seed))
    return replace(result, experts=experts, refinement=info)


__all__ = ["CompressOptions", "CompressError", "compress", "reduce_and_write", "reduce_group"]
