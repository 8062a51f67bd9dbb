"""Read a server's compression facts from its Prometheus `/metrics` (the plugin's gauges)."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def compression_gauges(base_url: str) -> dict:
    """{'experts_per_layer': [...], 'weight_bytes': ..., 'compression_ratio': ..., ...}; empty if absent."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    facts: dict = {}
    per_layer: dict[int, int] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("submoe_"):
            continue
        for sample in family.samples:
            key = sample.name.removeprefix("submoe_")
            if key == "experts":
                per_layer[int(sample.labels["layer"])] = int(sample.value)
            else:
                facts[key] = sample.value
    if per_layer:
        facts["experts_per_layer"] = [per_layer[l] for l in sorted(per_layer)]
    return facts
