"""The compressed checkpoint as it is written: a decoder layer at a time (in shards of at most
2 GiB), the expert maps and report entries gathered on the way, then config.json, tokenizer and
report at the end. Its state after each layer is what a resumed run continues from."""
from __future__ import annotations

import json
from pathlib import Path

from submoe_format.checkpoint import merged_count

from ..calibration.layers import CalibratedLayer
from ..methods import LayerResult, Method
from ..methods.output_error import duplicate_slot_rate
from ..options import CompressOptions
from ..source.architecture import SourceArchitecture
from ..source.checkpoint import LazyCheckpoint
from . import report
from .config import output_config
from .shards import ShardWriter, copy_tokenizer


class CompressedOutput:
    def __init__(self, directory: Path, source: LazyCheckpoint, arch: SourceArchitecture, opts: CompressOptions,
                 state: dict | None = None):
        """`state` (from `.state()`) continues an interrupted run after its finished layers."""
        state = state or {}
        self.dir, self.source, self.arch, self.opts = directory, source, arch, opts
        self.shards = ShardWriter(directory, state.get("writer"))
        self.layers_done: int = state.get("layers_done", 0)
        self.maps: list[list[int] | None] = state.get("maps", [])
        self.report_layers: list[dict] = state.get("report_layers", [])
        self.dtype = source.get("model.embed_tokens.weight").dtype  # experts are written as the source stores them
        if not self.layers_done:
            self.shards.write({n: source.get(n) for n in source.names() if not n.startswith("model.layers.")})

    def state(self) -> dict:
        return {"layers_done": self.layers_done, "writer": self.shards.state(), "maps": self.maps,
                "report_layers": self.report_layers}

    def add(self, layer: CalibratedLayer, result: LayerResult | None, error: float | None = None,
            seconds: float = 0.0) -> None:
        """Write one decoder layer: as read (no routed experts), or with its merged experts."""
        self.layers_done = layer.index + 1
        if result is None:
            self.shards.write(layer.tensors)
            self.maps.append(None)
            return
        tensors = dict(layer.tensors)
        if self.opts.export == "vanilla":  # the router keeps each merged expert's representative row
            router = self.arch.layout.router_tensor(layer.index)
            tensors[router] = tensors[router][result.representatives]
        self.shards.write({**tensors, **self.arch.expert_tensors(layer.index, result.experts.to(self.dtype))})
        self.maps.append(result.expert_map)
        duplicates = duplicate_slot_rate(layer.stats, result) if self.opts.export == "remap" else 0.0  # N' rows: none
        self.report_layers.append(report.layer_entry(layer.index, layer.stats, result, error, seconds, duplicates))

    def finish(self, method: Method, calib_info: dict, seconds: float, rss_before_weights: int) -> dict:
        """config.json, tokenizer, index and report: the directory is then a complete checkpoint."""
        self.shards.finish()
        for f in self.dir.glob("*.f32"):
            f.unlink()
        source_bytes = self.source.nbytes()
        config = output_config(self.source.config, self.arch, self.maps, method=self.opts.method,
                               export=self.opts.export, source_path=str(self.opts.model), source_bytes=source_bytes,
                               weight_bytes=self.shards.total_bytes)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer(self.source.dir, self.dir)
        out = report.build(self.opts, method, calib_info, self.report_layers, [merged_count(m) for m in self.maps],
                           source_bytes, self.shards.total_bytes, self.arch.num_experts, seconds,
                           report.peak_rss_bytes(), rss_before_weights)
        report.write(out, self.dir)
        return out
