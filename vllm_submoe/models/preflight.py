"""The checkpoint checked in vLLM's API server, before any engine process starts.

vLLM calls each architecture's entry in `MODELS_CONFIG_MAP` while it builds the model config, in
the process that parses `vllm serve`'s arguments. Registering the plugin's architectures there
makes a bad checkpoint fail in seconds, with one error naming file, layer and field, instead of
after the engine core and its workers have started (minutes, and a traceback from each process).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from submoe_format.check import check_checkpoint
from submoe_format.errors import SubMoEError
from ..vllm_compat import has_fp8_kernels, internal


class ServingOptionError(SubMoEError, ValueError):
    """A `vllm serve` option this checkpoint cannot be served with on this vLLM build."""


def check_quantization(quantization: str | None, fp8_kernels: bool) -> None:
    """Online FP8 (`--quantization fp8`) quantises the merged experts as it loads them: it needs vLLM's
    FP8 kernels, which its CPU build lacks (it would fail inside the worker a minute later)."""
    if quantization == "fp8" and not fp8_kernels:
        raise ServingOptionError("--quantization fp8: this vLLM build has no FP8 kernels (vLLM's CPU build); "
                                 "serve without --quantization here, or with it on a CUDA GPU")


def check_expert_parallel(enabled: bool, cpu_build: bool) -> None:
    """Expert parallelism on vLLM's CPU build ends in a segmentation fault inside its CPU fused-MoE
    kernel (stock models too, vLLM 0.32): refuse it while the arguments are read instead."""
    if enabled and cpu_build:
        raise ServingOptionError("--enable-expert-parallel: vLLM's CPU build cannot run expert parallelism (its CPU "
                                 "fused-MoE kernel crashes on it, for stock models too); drop the flag: "
                                 "--tensor-parallel-size alone splits every expert across the CPU workers, "
                                 "or serve with expert parallelism on CUDA GPUs")


def check_executor_backend(backend, cpu_build: bool) -> None:
    """vLLM's CPU platform has no Ray support: its engine core fails on `--distributed-executor-backend ray`
    after it started. Refuse it while the arguments are read."""
    if backend == "ray" and cpu_build:
        raise ServingOptionError("--distributed-executor-backend ray: vLLM's CPU build has no Ray support; serve on "
                                 "one machine with --tensor-parallel-size / --pipeline-parallel-size (the mp backend), "
                                 "or across machines with Ray on CUDA GPUs")


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

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            parallel, cpu = vllm_config.parallel_config, internal("current_platform").is_cpu()
            check_expert_parallel(parallel.enable_expert_parallel, cpu)
            check_executor_backend(parallel.distributed_executor_backend, cpu)

    for arch in architectures:
        MODELS_CONFIG_MAP.setdefault(arch, SubMoECheckpointCheck)
