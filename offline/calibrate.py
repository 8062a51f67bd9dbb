"""`submoe calibrate`: the calibration alone, measured once for many compressions.

    options   what was asked, checked before anything is read (calibration/settings.py)
    source    the checkpoint, memory-mapped, and its architecture (source/)
    calibrate one decoder layer at a time through the source (calibration/)
    write     each MoE layer's statistics as it streams past, then statistics.json, in a work
              directory that survives a killed run and resumes it (calibration/stats_file.py)

`submoe compress --stats DIR` then reads them instead of calibrating, for any method and ratio.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from .calibration.layer_source import LayerSource
from .calibration.layers import save_resume_point
from .calibration.settings import CalibrateOptions
from .calibration.stats_file import META, finish, layer_file, save_layer
from .source.architecture import SourceArchitecture
from .source.checkpoint import LazyCheckpoint
from .writing.workdir import resumable_output_dir


def calibrate(opts: CalibrateOptions) -> dict:
    """Write every MoE layer's statistics of `opts.model` to `opts.out`; returns statistics.json's content."""
    started = time.time()
    opts.check()
    source = LazyCheckpoint(opts.model)
    arch = SourceArchitecture.of(source.config)
    layers = LayerSource(source, arch, opts, needs=opts.statistics)
    with resumable_output_dir(opts.out, opts.force, opts.fingerprint(), opts.restart, protect=source.dir,
                              marker=META) as work:
        done, earlier = work.state.get("layers_done", 0), work.state.get("seconds", 0)
        for layer in tqdm(layers.after(done, work.dir), total=len(arch.moe_layers()), initial=done, unit="layer",
                          disable=not opts.progress, desc=f"calibrate {source.dir.name}"):
            if layer.stats is not None:
                save_layer(layer.stats, work.dir / layer_file(layer.index))
            save_resume_point(layer, work.dir)
            work.save(layers_done=layer.index + 1, seconds=earlier + time.time() - started)
            del layer
        seconds = round(earlier + time.time() - started, 2)
        return finish(work.dir, str(opts.model), source, arch, opts.statistics, {**layers.info, "seconds": seconds})
