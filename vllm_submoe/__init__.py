"""vLLM plugin that serves checkpoints written by `submoe compress`.

`register()` runs in every vLLM process (API server, engine core, workers) through the
`vllm.general_plugins` entry point: it stays cheap and idempotent, and imports vLLM lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

from submoe_format.families import FAMILIES

# architecture name in config.json -> "module:class" (vLLM imports it only when used; the class is
# generated from the family's entry by vllm_submoe.models.classes)
MODEL_CLASSES = {family.plugin_architecture: f"vllm_submoe.models.classes:{family.plugin_architecture}"
                 for family in FAMILIES}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    from .models import preflight
    preflight.register(MODEL_CLASSES)
