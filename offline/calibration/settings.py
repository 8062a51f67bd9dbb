"""How calibration runs: the settings `submoe calibrate` and `submoe compress` share, each default
written once here, and the one rule for what a resumed run must match."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch

from submoe_format.errors import SubMoEError

from .stats import ALL_STATISTICS


class CalibrationError(SubMoEError):
    """Calibration settings or inputs that cannot work."""


@dataclass(kw_only=True)
class Calibration:
    model: str  # source checkpoint directory (or hub id)
    out: Path
    calib: list[str] = field(default_factory=list)  # text files, one per domain, or hf:DATASET[:CONFIG[:SPLIT]]
    samples: int = 256  # calibration windows
    seq_len: int = 256  # tokens per window
    output_tokens: int = 2048  # sampled tokens on which every expert's output is measured
    seed: int = 0
    device: str = "cpu"  # where each layer is computed, one at a time
    calib_batch: int = 16  # windows through a layer at once: bounds the transient activations
    activation_memory: int = 1 << 30  # bytes of activations kept in RAM; more spill to a file
    force: bool = False  # replace an earlier output of this command
    restart: bool = False  # drop a partial earlier run of this --out instead of resuming it
    progress: bool = True

    # how a run goes, not what it computes: a partial run resumes whatever these are
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"out", "device", "calib_batch", "activation_memory", "force", "restart", "progress"})

    def fingerprint(self) -> dict:
        """What must match for a partial run to be resumed: every setting that changes the result."""
        def plain(value):
            return sorted(value) if isinstance(value, (set, frozenset)) else str(value) if isinstance(value, Path) else value
        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.name not in self.RUN_ONLY}

    def check(self) -> None:
        """One clear error for settings that cannot work, before anything is read."""
        if self.output_tokens < 1:
            raise CalibrationError(f"--output-tokens must be at least 1, got {self.output_tokens}")
        if self.calib_batch < 1 or self.activation_memory < 0:
            raise CalibrationError(f"--calib-batch must be at least 1 and --activation-memory at least 0, got "
                                   f"{self.calib_batch} and {self.activation_memory}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise CalibrationError("--device cuda was given but no CUDA device is visible: use --device cpu")


@dataclass(kw_only=True)
class CalibrateOptions(Calibration):
    """`submoe calibrate`: calibration alone, its statistics written for `compress --stats`."""

    statistics: frozenset[str] = ALL_STATISTICS  # the all-token statistics to compute

    def check(self) -> None:
        super().check()
        unknown = set(self.statistics) - ALL_STATISTICS
        if unknown:
            raise CalibrationError(f"unknown statistics {sorted(unknown)}; choose from {sorted(ALL_STATISTICS)}")
