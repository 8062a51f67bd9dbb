"""vLLM plugin that serves checkpoints written by `submoe compress`.

`register()` runs in every vLLM process (API server, engine core, workers) through the
`vllm.general_plugins` entry point: it stays cheap and idempotent, and imports vLLM lazily.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint_format import LAYOUTS

# architecture name in config.json -> "module:class" (imported by vLLM only when used)
MODEL_CLASSES = {layout.plugin_architecture: f"vllm_submoe.models.{layout.model_type}:{layout.plugin_architecture}"
                 for layout in LAYOUTS.values()}


def register() -> None:
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
