"""The checkpoint checked in vLLM's API server, before any engine process starts.

vLLM calls each architecture's entry in `MODELS_CONFIG_MAP` while it builds the model config, in
the process that parses `vllm serve`'s arguments. Registering the plugin's architectures there
makes a bad checkpoint fail in seconds, with one error naming file, layer and field, where it
used to fail after the engine core and its workers had started (about 100 s here, four tracebacks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..check import check_checkpoint
from ..errors import SubMoEError
from ..vllm_compat import has_fp8_kernels, internal


class ServingOptionError(SubMoEError, ValueError):
    """A `vllm serve` option this checkpoint cannot be served with on this vLLM build."""


def check_quantization(quantization: str | None, fp8_kernels: bool) -> None:
    """Online FP8 (`--quantization fp8`) quantises the merged experts as it loads them: it needs vLLM's
    FP8 kernels, which its CPU build lacks (it would fail inside the worker a minute later)."""
    if quantization == "fp8" and not fp8_kernels:
        raise ServingOptionError("--quantization fp8: this vLLM build has no FP8 kernels (vLLM's CPU build); "
                                 "serve without --quantization here, or with it on a CUDA GPU")


def register(architectures: Iterable[str]) -> None:
    MODELS_CONFIG_MAP, VerifyAndUpdateConfig = internal("MODELS_CONFIG_MAP"), internal("VerifyAndUpdateConfig")

    class SubMoECheckpointCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            # A local directory is checked here; a hub id is resolved later by vLLM's loader, and
            # the worker checks what it loads either way.
            if Path(model_config.model).is_dir():
                check_checkpoint(model_config.model)
            if getattr(model_config, "quantization", None) == "fp8":
                check_quantization("fp8", has_fp8_kernels())

    for arch in architectures:
        MODELS_CONFIG_MAP.setdefault(arch, SubMoECheckpointCheck)
