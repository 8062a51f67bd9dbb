"""Does this vLLM give the plugin everything it builds on? Every internal the compatibility layer
names, and every plugin model class, tried once; one line per problem.

    python -m vllm_submoe.selfcheck      # `make compat` runs it on each supported vLLM release
"""
from __future__ import annotations

import importlib
import sys

from submoe_format.families import FAMILIES

from .vllm_compat import INTERNALS, VLLMCompatError, internal, resolve, vllm_version


def problems() -> list[str]:
    """Every internal and every plugin model class this vLLM cannot give, as one line each."""
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
    if not out:  # building the classes needs every name above
        classes = importlib.import_module("vllm_submoe.models.classes")
        for family in FAMILIES:
            try:
                getattr(classes, family.plugin_architecture)
            except Exception as e:  # a class that cannot be built is exactly what this check reports
                out.append(f"{family.plugin_architecture}: {type(e).__name__}: {e}")
    return out


def main() -> int:
    found = problems()
    print(f"vLLM {vllm_version()}: " + ("plugin internals and model classes resolve" if not found else
                                        f"{len(found)} problem(s)"))
    for line in found:
        print(f"  {line}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
