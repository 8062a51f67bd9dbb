"""The packages' one-way layers (DESIGN): `submoe_format` (the checkpoint contract: no torch, no
vLLM) at the bottom; on it, each without the others, `offline` (compression: runs where vLLM is not
installed), `vllm_submoe` (the plugin) and `serving` (the load tester); the `submoe` command above
them, importing each only when its subcommand runs. Inside `offline` the folders follow the data
flow one way too (source, calibration, methods, options, writing, then the pipelines).

Static: every import statement of every installed module, lazy ones inside functions included,
checked against the rules (file:line of each breach), and no import circle between our modules.
Dynamic: what a few entry points really load."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("submoe_format", "vllm_submoe", "offline", "serving", "submoe")
CONTRACT = ("submoe_format.check", "submoe_format.checkpoint", "submoe_format.errors", "submoe_format.families",
            "submoe_format.texts")
HEAVY_LIBRARIES = ("torch", "vllm", "transformers")

# package -> imports it must not make (a module and its submodules)
FORBIDDEN = {
    "submoe_format": ("vllm_submoe", "offline", "serving", "submoe") + HEAVY_LIBRARIES,
    "vllm_submoe": ("offline", "serving", "submoe"),
    "offline": ("serving", "submoe", "vllm", "vllm_submoe"),
    "serving": ("offline", "submoe", "vllm_submoe"),
    "submoe": (),
}
# ... and inside offline, the data flow: source -> calibration -> methods -> options -> writing -> the pipelines
PIPELINES = ("offline.compress", "offline.calibrate", "offline.evaluate", "offline.cli")
FORBIDDEN.update({
    "offline.source": ("offline.calibration", "offline.methods", "offline.options", "offline.writing", *PIPELINES),
    "offline.calibration": ("offline.methods", "offline.options", "offline.writing", *PIPELINES),
    "offline.methods": ("offline.options", "offline.writing", *PIPELINES),
    "offline.writing": PIPELINES,
})


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file, and whether it is a package's __init__."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_init = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_init else parts), is_init


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of everything the file imports, relative imports resolved;
    `from X import a` yields X and X.a (a may be a submodule); `importlib.import_module("X")`
    and `__import__("X")` with a literal name count too."""
    name, is_init = _module_name(path)
    package = name.split(".") if is_init else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package) - 1:
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: relative import beyond the package")
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _breaches(package: str) -> list[str]:
    out = []
    files = sorted((ROOT / package.replace(".", "/")).rglob("*.py"))
    assert files, f"no sources under {package}/"
    for f in files:
        bad = sorted({(line, target) for line, target in imports_of(f)
                      if _within(target, FORBIDDEN[package])})
        # one entry per breach: `from serving import launcher` names serving, not serving.launcher too
        out += [f"{f.relative_to(ROOT)}:{line}: {package} imports {target}" for line, target in bad
                if not any(l == line and target.startswith(t + ".") for l, t in bad)]
    return out


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_follow_the_layers(package):
    bad = _breaches(package)
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


def import_graph() -> dict[str, set[str]]:
    """Our module -> our modules it imports (lazily too); a module's own parent packages are not
    edges, Python has imported them before it runs."""
    modules = {_module_name(f)[0]: f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))}
    return {name: {t for _, t in imports_of(f) if t in modules and t != name and not name.startswith(t + ".")}
            for name, f in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as e:
        return e.args[1]
    return None


def test_no_module_imports_itself_round_a_circle():
    """A circle (a -> b -> a, even through a lazy import) means neither module can be read or
    loaded alone; the checker finds one planted in the real graph."""
    graph = import_graph()
    assert find_cycle(graph) is None, "import circle: " + " -> ".join(find_cycle(graph))
    planted = {**graph, "submoe_format.families": graph["submoe_format.families"] | {"vllm_submoe.models.classes"}}
    cycle = find_cycle(planted)
    assert cycle and "submoe_format.families" in cycle and "vllm_submoe.models.classes" in cycle


@pytest.mark.parametrize("module", CONTRACT)
def test_each_contract_module_loads_where_torch_and_vllm_cannot(module):
    """The checkpoint contract is read where neither torch nor vLLM is installed (a CI job, a
    laptop checking a checkpoint): each module, alone, in a process that cannot import them."""
    blocked = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HEAVY_LIBRARIES)
    loaded = _loaded(blocked + f"import {module}")
    assert module.split(".")[0] in loaded
    with pytest.raises(AssertionError, match="ModuleNotFoundError|ImportError"):
        _loaded(blocked + "import vllm_submoe.metrics")  # the probe does block them


def test_import_resolution(tmp_path, monkeypatch):
    """The checker itself: relative imports stay in their package, `from pkg import mod` is seen."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    src = tmp_path / "offline" / "source"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("from .checkpoint import X\nfrom .. import methods\n")
    (src / "checkpoint.py").write_text(
        "from ..writing import shards\nfrom . import architecture\n"
        "from submoe_format import texts; from vllm_submoe import endpoint\n"
        "def f():\n    import serving.launcher\n    importlib.import_module('vllm.config')\n")
    assert {t for _, t in imports_of(src / "__init__.py")} == {
        "offline.source.checkpoint", "offline.source.checkpoint.X", "offline", "offline.methods"}
    assert {t for _, t in imports_of(src / "checkpoint.py")} == {
        "offline.writing", "offline.writing.shards", "offline.source", "offline.source.architecture",
        "submoe_format", "submoe_format.texts", "vllm_submoe", "vllm_submoe.endpoint", "serving.launcher",
        "vllm.config"}
    assert _breaches("offline") == ["offline/source/checkpoint.py:3: offline imports vllm_submoe",
                                    "offline/source/checkpoint.py:5: offline imports serving.launcher",
                                    "offline/source/checkpoint.py:6: offline imports vllm.config"]


def _loaded(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running `code`."""
    probe = (f"{code}\nimport sys, json\n"
             "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


HEAVY = {"torch", "transformers", "openai", "httpx", "prometheus_client"}
HELP = "from submoe.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code"


@pytest.mark.parametrize("code, forbidden", [
    ("import offline.cli", {"vllm", "serving", "submoe", "openai"}),
    ("import " + ", ".join(CONTRACT), {"vllm", "torch", "transformers", "offline", "serving", "submoe",
                                       "vllm_submoe"}),
    ("import submoe.cli", HEAVY | {"offline", "serving", "vllm"}),
    (HELP.format(argv=["--help"]), HEAVY | {"offline", "serving", "vllm"}),
    (HELP.format(argv=["compress", "--help"]), {"openai", "httpx", "prometheus_client", "serving", "vllm"}),
    ("import vllm_submoe.models.classes as m\nfrom vllm_submoe import MODEL_CLASSES\n"
     "[getattr(m, t.split(':')[1]) for t in MODEL_CLASSES.values()]", {"offline", "serving", "submoe"}),
], ids=["offline.cli", "submoe_format", "submoe.cli", "submoe --help", "submoe compress --help",
        "plugin model classes"])
def test_entry_point_loads_only_its_layer(code, forbidden):
    bad = _loaded(code) & forbidden
    assert not bad, f"{code!r} loaded {sorted(bad)}"


def test_the_vllm_internals_the_plugin_uses_resolve_and_a_missing_one_is_named():
    """vllm_submoe.vllm_compat is the one door to vLLM's internals (`make compat` runs the self-check
    on each supported release): here, on the installed one, everything resolves; a missing name is
    one error naming it and the supported releases."""
    from vllm_submoe.models.remapped_moe import RemappedRouter
    from vllm_submoe.selfcheck import problems
    from vllm_submoe.vllm_compat import VLLMCompatError, resolve
    assert problems() == []
    with pytest.raises(VLLMCompatError, match=r"has no vllm\.model_executor\.layers\.fused_moe\.NoSuchFactory .*"
                                              r"supports vLLM 0\.32-0\.33"):
        resolve("vllm.model_executor.layers.fused_moe:NoSuchFactory")
    # vLLM 0.33 would hand the logits to a monolithic kernel that routes itself, skipping the remap
    assert RemappedRouter.supports_monolithic_kernels.fget(None) is False
