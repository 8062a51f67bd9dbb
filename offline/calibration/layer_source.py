"""Where a run's calibrated layers come from: a `submoe calibrate` statistics file, or calibrating
the source now (sequentially if asked), in both cases continuing a resumed run after its finished
layers."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..source.architecture import SourceArchitecture
from ..source.checkpoint import LazyCheckpoint
from .layers import CalibratedLayer, calibrated_layers, resume_point
from .settings import Calibration, CalibrationError
from .stats_file import StatsFile, stats_layers
from .windows import source_windows


class LayerSource:
    """The source's decoder layers in order, each with its statistics. Checks and tokenizes when
    made (before anything is written); `info` is the calibration as the report tells it."""

    def __init__(self, source: LazyCheckpoint, arch: SourceArchitecture, opts: Calibration, needs: frozenset[str],
                 stats: str | None = None, sequential: bool = False, method: str = ""):
        self.source, self.arch, self.opts, self.needs, self.sequential = source, arch, opts, needs, sequential
        self.stats = StatsFile(stats) if stats else None
        if self.stats:
            self.stats.check(source, needs, method)
            self.info = {**self.stats.calibration, "statistics_file": str(stats),
                         "calibrate_seconds": self.stats.calibration["seconds"]}
            return
        if not source.has_tokenizer():
            raise CalibrationError(f"{source.dir} has no tokenizer.json / tokenizer_config.json: calibration text "
                                   f"cannot be tokenized")
        self.windows, info = source_windows(source, opts.calib, opts.samples, opts.seq_len, opts.seed)
        self.info = {**info, "output_tokens": opts.output_tokens}

    def after(self, done: int, work_dir: Path) -> Iterator[CalibratedLayer]:
        """The layers after the first `done`; activations spill to, and resume from, `work_dir`."""
        if self.stats:
            return stats_layers(self.source, self.stats, start=done)
        shape = (*self.windows.shape, self.arch.config.hidden_size)
        resume, resume_source = resume_point(work_dir, shape, self.sequential) if done else (None, None)
        return calibrated_layers(self.source, self.windows, self.opts, work_dir, start=done, resume=resume,
                                 needs=self.needs, sequential=self.sequential, resume_source=resume_source)
