"""What a running server says about itself: its Prometheus `/metrics` (the plugin's compression
gauges beside vLLM's own) and the plugin's `/submoe/compression` JSON."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def _get(url: str, headers: dict | None = None) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return r.read()


def metric_samples(base_url: str, headers: dict | None = None) -> list:
    """Every sample on `/metrics` (prometheus_client's own parser)."""
    text = _get(f"{base_url}/metrics", headers).decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def compression_gauges(base_url: str, headers: dict | None = None, samples: list | None = None) -> dict:
    """{'experts_per_layer': [...], 'weight_bytes': ..., 'compression_ratio': ..., ...}; empty if absent."""
    facts: dict = {}
    per_layer: dict[int, int] = {}
    for sample in samples if samples is not None else metric_samples(base_url, headers):
        if not sample.name.startswith("submoe_"):
            continue
        key = sample.name.removeprefix("submoe_")
        if key == "experts":
            per_layer[int(sample.labels["layer"])] = int(sample.value)
        else:
            facts[key] = sample.value
    if per_layer:
        facts["experts_per_layer"] = [per_layer[l] for l in sorted(per_layer)]
    return facts


def engine_counters(base_url: str, headers: dict | None = None, samples: list | None = None) -> dict:
    """KV-cache blocks and block size (vLLM's cache_config_info), preemptions and finished
    requests so far (counters: take differences between two reads)."""
    facts = {"preemptions": 0.0, "requests_finished": 0.0}
    for s in samples if samples is not None else metric_samples(base_url, headers):
        if s.name == "vllm:cache_config_info":
            facts["kv_cache_blocks"] = int(s.labels["num_gpu_blocks"])
            facts["block_size"] = int(s.labels["block_size"])
        elif s.name == "vllm:num_preemptions_total":
            facts["preemptions"] += s.value
        elif s.name == "vllm:request_success_total":
            facts["requests_finished"] += s.value
    return facts


def compression_description(base_url: str, headers: dict | None = None) -> dict | None:
    """The plugin's JSON description, or None where the route is not switched on."""
    try:
        return json.loads(_get(f"{base_url}/submoe/compression", headers))
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
