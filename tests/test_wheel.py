"""The built wheel works on its own: installed into a fresh environment outside the repository,
`submoe` runs and compresses, with nothing taken from the checkout (no repository-relative
defaults, no data files left behind, every module shipped).

The fresh venv reuses the already installed dependencies through a `.pth` line naming this
interpreter's site-packages: a plain path line runs none of the `.pth` hooks in that directory
(the editable install's among them), so the repository's packages are importable there only
from the wheel."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import CALIB, SHIPPED

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("offline", "serving", "submoe", "submoe_format", "vllm_submoe")


def _run(cmd, cwd, timeout=120):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(scratch directory outside the repository, the fresh venv, the wheel) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert ROOT not in tmp.parents
    # Build from a copy of what the wheel is made of: an in-tree build would write build/ and
    # *.egg-info into the shared checkout, and setuptools would ship stale modules left in build/lib.
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    for p in PACKAGES:
        shutil.copytree(ROOT / p, src / p, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    proc = _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q",
                 "-w", tmp / "dist"], cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("vllm_submoe-*.whl")

    venv = tmp / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_project_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    # This interpreter's pip installs into the fresh venv (it has none of its own: faster).
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                 "--force-reinstall", wheel], cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return tmp, venv, wheel


def test_the_wheel_holds_the_packages_and_the_command(installed):
    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {*PACKAGES, wheel.name.split("-py")[0] + ".dist-info"}
    assert {"submoe/cli.py", "submoe/__main__.py", "offline/cli.py", "serving/loadtest/cli.py",
            "submoe_format/errors.py"} <= set(names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "submoe = submoe.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_packages_come_from_the_wheel(installed):
    tmp, venv, _ = installed
    code = f"import {', '.join(PACKAGES)}; print('\\n'.join(m.__file__ for m in ({', '.join(PACKAGES)})))"
    proc = _run([venv / "bin" / "python", "-c", code], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = proc.stdout.split()
    assert len(files) == len(PACKAGES), proc.stdout
    for f in files:
        assert Path(f).is_relative_to(venv) and not Path(f).is_relative_to(ROOT), f


def test_installed_submoe_runs_outside_the_repository(installed):
    tmp, venv, _ = installed
    proc = _run([venv / "bin" / "submoe", "--help"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(f"    {c} " in proc.stdout for c in ("compress", "eval", "loadtest")), proc.stdout
    proc = _run([venv / "bin" / "submoe", "loadtest", "http://127.0.0.1:9"], cwd=tmp)
    assert proc.returncode == 2 and "the following arguments are required: --data" in proc.stderr


def test_installed_submoe_compresses(installed):
    from offline.synthetic import random_mixtral
    tmp, venv, _ = installed
    model, out = tmp / "random-mixtral", tmp / "compressed"
    random_mixtral(model, tokenizer_dir=SHIPPED)
    proc = _run([venv / "bin" / "submoe", "compress", "--model", model, "--out", out, "--method", "submoe",
                 "--num-experts", "4", "--calib", *CALIB, "--samples", "4", "--seq-len", "32", "--no-progress"],
                cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "config.json").is_file() and f"wrote {out}" in proc.stdout
    proc = _run([venv / "bin" / "submoe", "compress", "--model", model, "--out", tmp / "other", "--method", "magic",
                 "--num-experts", "4", "--calib", *CALIB, "--no-progress"], cwd=tmp)
    assert proc.returncode == 2 and proc.stderr.startswith("submoe compress: error: unknown method 'magic'"), \
        proc.stderr[-2000:]
