"""Calibrate once, compress many: `submoe calibrate` writes every MoE layer's statistics to a
directory, and `submoe compress --stats DIR` merges from them without running the calibration again.

    DIR/statistics.json      format, the source's identity, the calibration's settings, what was computed
    DIR/layer-007.safetensors  one MoE layer's LayerStats tensors (written as the layer streams past)

Statistics are measured on the *source's* hidden states, so they do not depend on the method or the
expert count: any method whose statistics the file holds, at any ratio, reuses them. The run is
resumable like `compress` (a `.DIR.partial` work directory; a rerun continues after the last layer).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from safetensors import safe_open
from safetensors.torch import save_file

from ..source.architecture import SourceArchitecture
from ..source.checkpoint import LazyCheckpoint
from .layers import CalibratedLayer, read_layer
from .settings import CalibrationError
from .stats import ALL_STATISTICS, LayerStats, statistic_fields

FORMAT = 1
META = "statistics.json"
PER_TOKEN = ("frequency", "tokens", "router_logits", "moe_output")  # always there


class StatsFileError(CalibrationError):
    """A statistics directory that cannot serve this compression."""


def source_identity(ckpt: LazyCheckpoint) -> dict:
    """What ties statistics to the weights they were measured on: config, and per weight file its size
    and a hash of its first and last MiB (headers and the tensors there; cheap at any model size)."""
    files = {}
    for f in sorted(ckpt.dir.glob("*.safetensors")):
        size, h = f.stat().st_size, hashlib.sha256()
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
        files[f.name] = {"bytes": size, "sha256_ends": h.hexdigest()}
    return {"config": ckpt.config, "files": files}


def finish(directory: Path, model: str, source: LazyCheckpoint, arch: SourceArchitecture,
           statistics: frozenset[str], calibration: dict) -> dict:
    """Write statistics.json beside the finished layer files, which makes `directory` a statistics
    directory; returns what it holds."""
    for f in directory.glob("*.f32"):  # the activations a resumed run would have continued from
        f.unlink()
    meta = {"format": FORMAT, "source": source_identity(source), "model": model,
            "calibration": calibration, "statistics": sorted(statistics),
            "moe_layers": [i for i, m in enumerate(arch.moe_layers()) if m]}
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def layer_file(index: int) -> str:
    return f"layer-{index:03d}.safetensors"


def save_layer(stats: LayerStats, path: Path) -> None:
    tensors = {k: getattr(stats, k) for k in (*PER_TOKEN, *statistic_fields(ALL_STATISTICS))
               if getattr(stats, k) is not None}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"samples": str(stats.samples)})
    tmp.replace(path)


class StatsFile:
    """A finished statistics directory, checked against the source and the method that will read it."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta = self.dir / META
        if not meta.is_file():
            partial = self.dir.parent / f".{self.dir.name}.partial"
            hint = (f" ({partial} holds an unfinished run: rerun the same `submoe calibrate` to finish it)"
                    if partial.exists() else " (write one with `submoe calibrate`)")
            raise StatsFileError(f"{self.dir} is not a statistics directory: it has no {META}{hint}")
        self.meta = json.loads(meta.read_text())
        if self.meta.get("format") != FORMAT:
            raise StatsFileError(f"{self.dir} is statistics format {self.meta.get('format')}, this version reads "
                                 f"{FORMAT}: rerun `submoe calibrate`")
        self.statistics = frozenset(self.meta["statistics"])
        self.calibration = self.meta["calibration"]

    def check(self, source: LazyCheckpoint, needs: frozenset[str], method: str) -> None:
        """One clear error if these statistics cannot stand in for calibrating `source` for `method`."""
        if source_identity(source) != self.meta["source"]:
            raise StatsFileError(f"{self.dir} was calibrated on {self.meta['model']}, whose weights or config differ "
                                 f"from {source.dir}: calibrate this model (`submoe calibrate --model {source.dir}`)")
        missing = sorted(needs - self.statistics)
        if missing:
            raise StatsFileError(f"--method {method} needs the statistics {missing}, which {self.dir} lacks (it holds "
                                 f"{sorted(self.statistics)}): rerun `submoe calibrate` without --statistics, or "
                                 f"compress without --stats")
        for i in self.meta["moe_layers"]:  # every layer's header now: a bad file fails before anything is written
            path = self.dir / layer_file(i)
            keys, _ = read_layer_file(path, tensors=False)
            wanted = {*PER_TOKEN, *statistic_fields(needs)}
            if not keys >= wanted:
                raise StatsFileError(f"{path} lacks {sorted(wanted - keys)}: rerun `submoe calibrate`")

    def layer(self, index: int, experts, routing) -> LayerStats:
        _, (tensors, samples) = read_layer_file(self.dir / layer_file(index))
        return LayerStats(experts=experts, routing=routing, samples=samples, **tensors)


def read_layer_file(path: Path, tensors: bool = True) -> tuple[set[str], tuple[dict, int] | None]:
    """A layer file's tensor names, and (with `tensors`) its tensors and sample count, in one opening;
    a missing, truncated or foreign file is one clear error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            loaded = ({k: f.get_tensor(k) for k in keys}, int(f.metadata()["samples"])) if tensors else None
    except Exception as e:
        raise StatsFileError(f"cannot read {path} ({type(e).__name__}: {e}): rerun `submoe calibrate`") from None
    return keys, loaded


def stats_layers(ckpt: LazyCheckpoint, stats: StatsFile, start: int = 0) -> Iterator[CalibratedLayer]:
    """The source one decoder layer at a time, as `calibrated_layers` yields it, its statistics read
    from `stats` instead of measured (no activations: nothing runs through the layers)."""
    arch = SourceArchitecture.of(ckpt.config)
    names = ckpt.names()
    for l, is_moe in enumerate(arch.moe_layers()):
        if l < start:
            continue
        tensors, experts, router = read_layer(ckpt, arch, names, l, is_moe)
        layer_stats = stats.layer(l, experts, arch.layer_routing(l, tensors)) if is_moe else None
        yield CalibratedLayer(l, tensors, experts, router, layer_stats)
        del tensors, experts, router, layer_stats
