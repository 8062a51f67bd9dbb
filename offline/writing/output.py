"""The compressed checkpoint as it is written: a decoder layer at a time (in shards of at most
2 GiB), the expert maps and report entries gathered on the way, then config.json, tokenizer and
report at the end. After each layer group it keeps what a resumed run continues from: its state,
the calibration's hidden states, and the seconds spent so far."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from submoe_format.checkpoint import correction_tensor, merged_count
from submoe_format.profile import source_record

from ..calibration.layers import CalibratedLayer, save_resume_point
from ..methods import Method
from ..methods.output_error import Measured
from ..options import CompressOptions
from ..source.architecture import SourceArchitecture
from ..source.checkpoint import LazyCheckpoint
from . import report
from .config import output_config
from .model_card import write_card
from .shards import ShardWriter, copy_tokenizer
from .workdir import Progress


class Clock:
    """A resumable run's seconds, its earlier runs included: in all, and calibrating (reading and
    running the layers)."""

    def __init__(self, state: dict, started: float):
        self.started, self.earlier = started, state.get("seconds", 0.0)
        self.calibration = state.get("calibration_seconds", 0.0)

    def total(self) -> float:
        return self.earlier + time.time() - self.started

    @contextmanager
    def calibrating(self):
        t0 = time.time()
        yield
        self.calibration += time.time() - t0

    def timed(self, layers: Iterable[CalibratedLayer]) -> Iterator[CalibratedLayer]:
        """`layers`, the time spent producing each counted as calibration."""
        it = iter(layers)
        while True:
            with self.calibrating():
                layer = next(it, None)
            if layer is None:
                return
            yield layer
            del layer  # a finished layer must not stay alive while the next one is read


class CompressedOutput:
    def __init__(self, work: Progress, source: LazyCheckpoint, arch: SourceArchitecture, opts: CompressOptions,
                 started: float):
        """Continues the run `work` holds after its finished layers (a fresh one: writes the
        tensors outside the decoder layers first)."""
        self.rss_before_weights = report.rss_bytes()  # libraries, tokenizer, calibration tokens
        state = work.state
        self.work, self.dir, self.source, self.arch, self.opts = work, work.dir, source, arch, opts
        self.clock = Clock(state, started)
        self.shards = ShardWriter(self.dir, state.get("writer"))
        self.layers_done: int = state.get("layers_done", 0)
        self.maps: list[list[int] | None] = state.get("maps", [])
        self.report_layers: list[dict] = state.get("report_layers", [])
        self.dtype = source.get("model.embed_tokens.weight").dtype  # experts are written as the source stores them
        self.bar = tqdm(total=len(arch.moe_layers()), initial=self.layers_done, unit="layer", disable=not opts.progress,
                        desc=f"compress {opts.method} {arch.num_experts}->{opts.num_experts}")
        # a profile writes only what changed; what it reads from the source counts in what it serves
        self.profile = opts.export == "profile"
        self.source_experts: list[list[int | None] | None] = state.get("source_experts", [])
        self.corrected: list[bool] = state.get("corrected", [])  # per layer: has correction vectors
        self.constants: list[list[int]] = state.get("constants", [])  # per layer: router experts served by them alone
        self.served_bytes: int = state.get("served_bytes", 0)
        if self.layers_done:
            self.bar.write(f"resuming {opts.out} after its first {self.layers_done} finished layers", file=sys.stderr)
        else:
            outside = {n: source.get(n) for n in source.names() if not n.startswith("model.layers.")}
            self._save(outside, from_source=set(outside) if self.profile else set())

    def add(self, group: list[CalibratedLayer], reduced: list[Measured]) -> None:
        """Write a group of decoder layers, then keep what a run killed from here on resumes from."""
        for layer, m in zip(group, reduced):
            self._write(layer, m)
        save_resume_point(group[-1], self.dir)
        self.work.save(layers_done=self.layers_done, writer=self.shards.state(), maps=self.maps,
                       source_experts=self.source_experts, served_bytes=self.served_bytes,
                       corrected=self.corrected, constants=self.constants,
                       report_layers=self.report_layers, seconds=self.clock.total(),
                       calibration_seconds=self.clock.calibration)
        self.bar.update(len(group))

    def _write(self, layer: CalibratedLayer, m: Measured) -> None:
        """One decoder layer: as read (no routed experts), or with its merged experts."""
        self.layers_done = layer.index + 1
        tensors, kept = dict(layer.tensors), None
        if m.result is not None:
            if self.opts.export == "vanilla":  # the router keeps each merged expert's representative row
                router = self.arch.layout.router_tensor(layer.index)
                tensors[router] = tensors[router][m.result.representatives]
            merged = self.arch.expert_tensors(layer.index, m.result.experts.to(self.dtype))
            tensors.update(merged)
            if m.result.correction is not None:
                tensors[correction_tensor(layer.index)] = m.result.correction.to(self.dtype)
            if self.profile:
                kept = self._unchanged_experts(layer.index, m.result.expert_map, merged)
            self.report_layers.append(report.layer_entry(layer.index, layer.stats, m))
        from_source = set()
        if self.profile:  # everything but the experts the compression changed
            from_source = set(layer.tensors) | {self.arch.layout.expert_tensor(layer.index, slot, w)
                                                for slot, j in enumerate(kept or []) if j is not None
                                                for w in ("gate", "down", "up")}
        self._save(tensors, from_source)
        self.maps.append(None if m.result is None else m.result.expert_map)
        self.source_experts.append(kept)
        self.corrected.append(m.result is not None and m.result.correction is not None)
        self.constants.append([] if m.result is None else m.result.constant)

    def _unchanged_experts(self, layer: int, expert_map: list[int | None], merged: dict) -> list[int | None]:
        """Per served expert, the source expert it is bit for bit (a pruning's kept experts, an
        unrefined singleton group), which a profile reads from the source; else None."""
        names = lambda e: [self.arch.layout.expert_tensor(layer, e, w) for w in ("gate", "down", "up")]  # noqa: E731

        def same(slot: int, j: int) -> bool:
            return all(a.dtype == b.dtype and torch.equal(a, b)
                       for a, b in ((merged[x], self.source.get(y)) for x, y in zip(names(slot), names(j))))
        return [next((j for j, e in enumerate(expert_map) if e == slot and same(slot, j)), None)
                for slot in range(merged_count(expert_map))]

    def _save(self, tensors: dict, from_source: set[str]) -> None:
        """Write `tensors` but those a profile reads from its source; count them all as served."""
        self.served_bytes += sum(v.numel() * v.element_size() for v in tensors.values())
        written = {k: v for k, v in tensors.items() if k not in from_source}
        if written:
            self.shards.write(written)

    def finish(self, method: Method, calibration: dict) -> dict:
        """config.json, tokenizer, index and report: the directory is then a complete checkpoint."""
        self.bar.close()
        if not self.shards.files:  # a pruning's profile: one empty file, where vLLM's loader looks for weights
            self.shards.write({})
        self.shards.finish()
        for f in self.dir.glob("*.f32"):
            f.unlink()
        source_bytes = self.source.nbytes()
        config = output_config(self.source.config, self.arch, self.maps, method=self.opts.method,
                               export=self.opts.export, source_path=str(self.opts.model), source_bytes=source_bytes,
                               weight_bytes=self.served_bytes,
                               profile=source_record(self.source.dir) if self.profile else None,
                               source_experts=self.source_experts, corrected=self.corrected,
                               constant_experts=self.constants)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer(self.source.dir, self.dir)
        # seconds: this run's reading and calibrating (with --stats, reading; calibrate_seconds is the file's)
        calibration = {**calibration, "seconds": round(self.clock.calibration, 2)}
        out = report.build(self.opts, method, calibration, self.report_layers, [merged_count(m) for m in self.maps],
                           source_bytes, self.served_bytes, self.arch.num_experts, self.clock.total(),
                           report.peak_rss_bytes(), self.rss_before_weights, written_bytes=self.shards.total_bytes)
        report.write(out, self.dir)
        write_card(out, self.dir, Path(self.opts.out).name, self.opts.command())
        return out
