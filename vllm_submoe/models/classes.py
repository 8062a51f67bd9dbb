"""The plugin's model classes, one per supported family, generated from submoe_format.families.

`SubMoE<X>ForCausalLM` is vLLM's own `<X>ForCausalLM` (from `vllm.model_executor.models.<module>`)
with `SubMoEModel` mixed in before it: each MoE layer's fused experts merged behind the
checkpoint's remap. A class is built on first access (`from vllm_submoe.models.classes import
SubMoEMixtralForCausalLM`, or vLLM's registry resolving "vllm_submoe.models.classes:<Name>"),
importing only its own vLLM module, and then cached here (so it pickles by reference too).
"""
from __future__ import annotations

import importlib
import types

from submoe_format.families import BY_PLUGIN
from .remapped_moe import SubMoEModel

__all__ = sorted(BY_PLUGIN)


def _build(name: str) -> type:
    family = BY_PLUGIN[name]
    vllm_module = importlib.import_module(f"vllm.model_executor.models.{family.vllm_module}")
    base = getattr(vllm_module, family.vllm_class)
    doc = (f"{name}: {family.description}\n\nvLLM's own {family.vllm_class}, with each MoE layer's fused "
           f"experts merged behind the checkpoint's remap.")

    def body(ns: dict) -> None:
        ns.update(__module__=__name__, __qualname__=name, __doc__=doc, arch_module=vllm_module)

    cls = types.new_class(name, (SubMoEModel, base), exec_body=body)
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    if name in BY_PLUGIN:
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(BY_PLUGIN))
