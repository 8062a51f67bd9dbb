"""Compression facts as Prometheus gauges on vLLM's `/metrics`, beside its latency histograms.

Loaded through the `vllm.stat_logger_plugins` entry point: it runs in the API-server process,
whose default registry `/metrics` serves. The facts are static, so they are set once at start.
Exported for any MoE vLLM serves (a stock Mixtral shows ratio 1), so two deployments compare.
"""
from __future__ import annotations

from prometheus_client import Gauge

from submoe_format.checkpoint import (
    BLOCK_KEY,
    CheckpointFormatError,
    layout_for,
    merged_count,
    served_expert_maps,
)
from submoe_format.profile import served_weight_bytes

from .vllm_compat import internal

StatLoggerBase = internal("StatLoggerBase")

_GAUGES: dict[str, Gauge] = {}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    # Module-level cache: a second engine in one process must not register the name twice.
    if name not in _GAUGES:
        _GAUGES[name] = Gauge(name, doc, ["model_name", *labels], multiprocess_mode="mostrecent")
    return _GAUGES[name]


def compression_facts(config: dict, model_dir: str, served_dtype_bytes: int | None = None) -> dict | None:
    """Experts per layer, expert parameters and bytes, total weight bytes, ratio to the source."""
    try:
        layout = layout_for(config)
    except CheckpointFormatError:
        return None  # not an MoE this plugin knows: nothing to export
    hidden, inter = config["hidden_size"], config[layout.intermediate_field]
    counts = [merged_count(m) for m in served_expert_maps(config)]  # 0: a layer without routed experts
    source = config.get(BLOCK_KEY, {}).get("source", {})
    expert_params = sum(counts) * 3 * hidden * inter
    # Local checkpoints: measured from the safetensors headers (a profile's source too); otherwise what
    # compress recorded.
    total = served_weight_bytes(model_dir, config) or config.get(BLOCK_KEY, {}).get("weight_bytes")
    facts = {
        "experts_per_layer": counts,
        "expert_parameters": expert_params,
        "expert_bytes": expert_params * (served_dtype_bytes or
                                         _DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2)),
        "weight_bytes": total,
        "source_weight_bytes": source.get("weight_bytes", total),
    }
    facts["compression_ratio"] = (facts["source_weight_bytes"] / total) if total else 1.0
    return facts


class SubMoEStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        model_config = vllm_config.model_config
        self.facts = compression_facts(model_config.hf_config.to_dict(), model_config.model,
                                       served_dtype_bytes=model_config.dtype.itemsize)
        if self.facts is None:
            return
        name = model_config.served_model_name
        name = name[0] if isinstance(name, (list, tuple)) else name
        for layer, n in enumerate(self.facts["experts_per_layer"]):
            _gauge("submoe_experts", "Experts held per MoE layer", ("layer",)).labels(name, str(layer)).set(n)
        _gauge("submoe_expert_parameters", "Expert parameters in all MoE layers").labels(name).set(
            self.facts["expert_parameters"])
        _gauge("submoe_expert_bytes", "Bytes of expert weights in the served dtype").labels(name).set(self.facts["expert_bytes"])
        if self.facts["weight_bytes"]:
            _gauge("submoe_weight_bytes", "Bytes of all weights in the checkpoint").labels(name).set(self.facts["weight_bytes"])
        _gauge("submoe_compression_ratio", "Source checkpoint bytes / this checkpoint's bytes").labels(name).set(
            self.facts["compression_ratio"])

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass

    def log_engine_initialized(self):
        pass
