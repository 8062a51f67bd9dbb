"""DESIGN's boundaries: compression runs where vLLM is not installed; the server carries no
compression code; the plugin package's import is light (register() imports vLLM lazily)."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, forbidden", [
    ("offline.cli", "vllm"),
    ("vllm_submoe", "vllm"),
    ("vllm_submoe.checkpoint_format", "torch"),
    ("vllm_submoe.models.mixtral", "offline"),
    ("vllm_submoe.metrics", "offline"),
])
def test_module_does_not_import(module, forbidden):
    code = (f"import sys, {module}; bad = [m for m in sys.modules if m == {forbidden!r} or "
            f"m.startswith({forbidden!r} + '.')]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing {module} pulled in {proc.stdout.strip()} {proc.stderr[-500:]}"
