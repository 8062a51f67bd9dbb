"""Every method, variant and export on both shipped Mixtrals writes the checkpoint recorded in
tests/data/output_checks.json, on any CPU.

The models are compressed as float32 copies: a bf16 checkpoint rounds the merged weights, so a
last-bit difference in float32 flips some entries by a whole bf16 step (0.4-0.8% of the entry) on
one CPU and not on the next, while float32 output keeps the differences as small as they are.

Integer facts are compared exactly: the expert maps (groupings and dropped experts), the served
architecture and expert count, every tensor's name, dtype and shape, and which tensors are the
source's own, copied unchanged. Every other tensor is compared by its RMS and a few entries at
fixed positions, within TOLERANCE of its RMS: MKL, oneDNN, LAPACK and ATen take other code paths
on other CPUs (AVX2, AVX-512, AMX; Intel or AMD) and move the last bits, which a real change to a
method moves by orders of magnitude more (see `--spread`).

    python tests/test_output_checks.py --record   # only when a change is *meant* to alter output
    python tests/test_output_checks.py --spread   # the deviation between this CPU's code paths

Statistics are calibrated once per model (`submoe calibrate`) and every case compresses from them
(`--stats`), except the cases that check calibrating itself: one calibrating run must equal its
`--stats` twin's record, and `--sequential` calibrates on the compressed model's hidden states.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CALIB, ROOT

RECORD = Path(__file__).parent / "data" / "output_checks.json"
MODELS = {"upcycled": ROOT / "models" / "tiny-mixtral-8e", "from-scratch": ROOT / "models" / "tiny-mixtral-8e-scratch"}
CALIBRATION = dict(calib=CALIB, samples=16, seq_len=64, output_tokens=512, seed=1)
SAMPLES = 3  # entries recorded per tensor, besides its RMS
# |got - recorded| <= TOLERANCE * the tensor's recorded RMS, for its RMS and each recorded entry. Measured
# (`--spread`): CPU code paths move them by at most 4.4e-5 (Sub-MoE†'s whitening; most cases 1e-5); a
# slight change to one step of a method by 5e-3 (Sub-MoE's weights f -> f^1.05), a real one by 1e-1.
TOLERANCE = 5e-4
# label: (method, experts, method options, other options); "stats": False calibrates in the run itself
CASES = {
    **{m: (m, 4, {}, {}) for m in ("submoe", "output-lsq", "mergemoe", "hc-smoe", "m-smoe", "reap", "ream",
                                   "freq-prune", "average", "random")},
    "output-lsq+refine": ("output-lsq", 4, {}, {"refine_steps": 25}),  # the recommended setting: keeps the merge here
    "average+refine": ("average", 4, {}, {"refine_steps": 25}),  # refinement's step kept in every layer
    "output-lsq+sequential": ("output-lsq", 4, {}, {"sequential": True, "stats": False}),
    "submoe+calibrating": ("submoe", 4, {}, {"stats": False}),  # equal to "submoe", which reads --stats
    "submoe+adaptive": ("submoe", 4, {"adaptive": True}, {}),
    "submoe+rank0.5": ("submoe", 4, {"rank_ratio": 0.5}, {}),
    "submoe+intra0.5": ("submoe", 4, {"intra_rank_ratio": 0.5}, {}),
    "output-lsq+align": ("output-lsq", 4, {"align_neurons": True}, {}),
    "mergemoe+align": ("mergemoe", 6, {"align_neurons": True}, {}),
    "reap+substitute": ("reap", 3, {"substitute_pruned": True}, {}),
    "hc-smoe-per-layer": ("hc-smoe", [6, 5, 4, 3], {}, {}),
    "reap-vanilla": ("reap", 4, {}, {"export": "vanilla"}),
    "m-smoe-vanilla": ("m-smoe", 6, {}, {"export": "vanilla"}),
}
RECORDED_AS = {"submoe+calibrating": "submoe"}  # cases that must write what another case wrote


def summary(path: Path, source: Path) -> dict:
    """What the record keeps of a checkpoint: its integer facts, and per tensor not copied from the
    source its dtype, shape, RMS and SAMPLES entries at evenly spaced positions."""
    from safetensors import safe_open

    from offline.source.checkpoint import LazyCheckpoint
    config = json.loads((path / "config.json").read_text())
    block = config.get("submoe")
    src = LazyCheckpoint(source)
    src_names = set(src.names())
    copied, tensors = hashlib.sha256(), {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name)
                if name in src_names and torch.equal(t, src.get(name)):  # a copy: no arithmetic involved
                    copied.update(name.encode() + b"\n")
                    continue
                flat = t.reshape(-1).double()
                at = (torch.arange(SAMPLES) * flat.numel() + flat.numel() // 2) // SAMPLES
                key = name.removeprefix("model.layers.").removesuffix(".weight")
                tensors[key] = [str(t.dtype).removeprefix("torch."), list(t.shape),
                                *(float(f"{v:.7g}") for v in [flat.square().mean().sqrt().item(), *flat[at].tolist()])]
    return {"architectures": config["architectures"], "num_local_experts": config["num_local_experts"],
            "expert_maps": [l and l["expert_map"] for l in block["layers"]] if block else None,
            "copied": copied.hexdigest()[:16], "tensors": tensors}


def compress_case(model: Path, out: Path, stats: Path | None, case: tuple) -> Path:
    from offline.compress import compress
    from offline.options import CompressOptions
    method, experts, options, other = case
    other = dict(other)
    use_stats = other.pop("stats", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(CompressOptions(model=str(model), out=out, method=method, num_experts=experts, method_options=options,
                                 progress=False, force=True, stats=str(stats) if use_stats else None,
                                 **CALIBRATION, **other))
    return out


def float32_copy(model: Path, out: Path) -> Path:
    """`model` with every tensor in float32 (the values unchanged: bf16 widens exactly)."""
    from safetensors.torch import load_file, save_file

    from offline.writing.shards import copy_tokenizer
    out.mkdir(parents=True)
    tensors = {n: t.float() for n, t in load_file(str(model / "model.safetensors")).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "dtype": "float32"}, indent=2))
    copy_tokenizer(model, out)
    return out


def calibrate_once(model: Path, out: Path) -> Path:
    from offline.calibrate import calibrate
    from offline.calibration.settings import CalibrateOptions
    calibrate(CalibrateOptions(model=str(model), out=out, progress=False, **CALIBRATION))
    return out


def differences(got: dict, want: dict) -> list[str]:
    """Each way `got` differs from the recorded `want`, one line each (nothing: the same checkpoint)."""
    out = [f"{k}: {got[k]} != recorded {want[k]}" for k in ("architectures", "num_local_experts", "expert_maps", "copied")
           if got[k] != want[k]]
    if got["tensors"].keys() != want["tensors"].keys():
        return out + [f"tensors written differ: {sorted(got['tensors'].keys() ^ want['tensors'].keys())}"]
    for name, (dtype, shape, *values) in got["tensors"].items():
        w_dtype, w_shape, *w_values = want["tensors"][name]
        if (dtype, shape) != (w_dtype, w_shape):
            out.append(f"{name}: {dtype} {shape} != recorded {w_dtype} {w_shape}")
            continue
        dev = deviation(values, w_values)
        if dev > TOLERANCE:
            out.append(f"{name}: deviates by {dev:.2e} of its RMS (tolerance {TOLERANCE:.0e}): {values} != recorded "
                       f"{w_values}")
    return out


def deviation(values: list[float], recorded: list[float]) -> float:
    """The largest difference between a tensor's RMS and entries and the recorded ones, in units of its RMS."""
    scale = max(recorded[0], 1e-30)
    return max(abs(a - b) for a, b in zip(values, recorded)) / scale


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per model: its float32 copy and the statistics calibrated once on it."""
    out = {}
    for model, path in MODELS.items():
        root = tmp_path_factory.mktemp(model)
        source = float32_copy(path, root / "source")
        out[model] = source, calibrate_once(source, root / "stats")
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_every_case_writes_the_recorded_checkpoint(model, record, calibrated, tmp_path):
    assert set(record["cases"][model]) == set(CASES) - set(RECORDED_AS), "record the cases anew (--record)"
    source, stats = calibrated[model]
    failed = {}
    for label, case in CASES.items():
        got = summary(compress_case(source, tmp_path / label, stats, case), source)
        problems = differences(got, record["cases"][model][RECORDED_AS.get(label, label)])
        if problems:
            failed[label] = problems[:4] + [f"... {len(problems) - 4} more"] * (len(problems) > 4)
    assert not failed, f"{model}: these checkpoints changed:\n" + json.dumps(failed, indent=1)


def test_a_slightly_altered_merge_fails_the_check(record, calibrated, tmp_path, monkeypatch):
    """One step of one method changed a little: Sub-MoE's frequency weights f_i -> f_i^1.05 (measured: moves
    some merged matrices by 5e-3 of their RMS, ten times the tolerance; CPU code paths move them by <= 5e-5)."""
    import offline.methods.submoe as submoe
    weights = submoe.merge_weights
    monkeypatch.setattr(submoe, "merge_weights", lambda f, members: weights(f.double() ** 1.05, members))
    source, stats = calibrated["upcycled"]
    got = summary(compress_case(source, tmp_path / "altered", stats, CASES["submoe"]), source)
    problems = differences(got, record["cases"]["upcycled"]["submoe"])
    assert problems and all("deviates by" in p for p in problems)


def test_the_check_sees_a_changed_merge_and_forgives_rounding(record):
    """The comparison itself: a recorded summary passes against itself, moved by a tenth of the tolerance
    in every value; it fails by a moved value, a changed map or a changed shape."""
    want = record["cases"]["upcycled"]["output-lsq"]
    assert differences(want, want) == []
    name, (dtype, shape, *values) = next(iter(want["tensors"].items()))
    nudged = [v + 0.1 * TOLERANCE * values[0] for v in values]
    assert differences({**want, "tensors": {**want["tensors"], name: [dtype, shape, *nudged]}}, want) == []
    moved = [values[0], values[1] + 1e-3 * values[0], *values[2:]]
    assert len(differences({**want, "tensors": {**want["tensors"], name: [dtype, shape, *moved]}}, want)) == 1
    maps = [list(m) for m in want["expert_maps"]]
    maps[0][0] = (maps[0][0] + 1) % 4
    assert "expert_maps" in differences({**want, "expert_maps": maps}, want)[0]
    assert "recorded" in differences({**want, "tensors": {**want["tensors"], name: [dtype, shape[::-1], *values]}},
                                     want)[0]


def record_all(out_path: Path) -> dict:
    import tempfile
    cases = {}
    with tempfile.TemporaryDirectory() as td:
        for model, path in MODELS.items():
            source = float32_copy(path, Path(td) / model / "source")
            stats = calibrate_once(source, Path(td) / model / "stats")
            cases[model] = {label: summary(compress_case(source, Path(td) / model / label, stats, case), source)
                            for label, case in CASES.items() if label not in RECORDED_AS}
            print(f"recorded {model}", file=sys.stderr)
    record = {"calibration": {k: v for k, v in CALIBRATION.items() if k != "calib"}, "cases": cases}
    out_path.write_text(to_json(record))
    return record


def to_json(record: dict) -> str:
    """The record with one line per tensor (a re-record's diff shows what moved)."""
    models = []
    for model, by_label in record["cases"].items():
        cases = []
        for label, got in by_label.items():
            fields = [f'    "{k}": {json.dumps(v)}' for k, v in got.items() if k != "tensors"]
            fields.append('    "tensors": {\n' + ",\n".join(f"     {json.dumps(n)}: {json.dumps(v)}"
                                                          for n, v in got["tensors"].items()) + "\n    }")
            cases.append(f"   {json.dumps(label)}: {{\n" + ",\n".join(fields) + "\n   }")
        models.append(f"  {json.dumps(model)}: {{\n" + ",\n".join(cases) + "\n  }")
    text = json.dumps({**record, "cases": "CASES"}, indent=1)
    return text.replace('"CASES"', "{\n" + ",\n".join(models) + "\n }") + "\n"


# CPU code paths this machine can be forced onto: what other CPUs take by default
CODE_PATHS = {
    "default": {},
    "AVX2 (ATen, MKL, oneDNN)": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                 "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "SSE4.2 (ATen's default kernels, MKL, oneDNN)": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                                                     "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "MKL's conditional-reproducibility path, 1 thread": {"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"},
}


def spread(tmp: Path) -> None:
    """Record under every code path in CODE_PATHS and print how far each moves from the default."""
    runs = {}
    for name, env in CODE_PATHS.items():
        out = tmp / f"{len(runs)}.json"
        subprocess.run([sys.executable, __file__, "--record-to", str(out)], check=True, env={**os.environ, **env})
        runs[name] = json.loads(out.read_text())["cases"]
    base = runs.pop("default")
    for name, cases in runs.items():
        worst, facts = (0.0, ""), []
        for model, by_label in cases.items():
            for label, got in by_label.items():
                want = base[model][label]
                facts += [f"{model}/{label}: {k}" for k in ("architectures", "num_local_experts", "expert_maps", "copied")
                          if got[k] != want[k]]
                for t, (_, _, *values) in got["tensors"].items():
                    dev = deviation(values, want["tensors"][t][2:])
                    worst = max(worst, (dev, f"{model}/{label}/{t}"))
        print(f"{name}: largest deviation {worst[0]:.2e} of the RMS ({worst[1]}); integer facts that differ: "
              f"{facts or 'none'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] == ["--record"]:
        record_all(RECORD)
    elif sys.argv[1:2] == ["--record-to"]:
        record_all(Path(sys.argv[2]))
    elif sys.argv[1:] == ["--spread"]:
        import tempfile
        with tempfile.TemporaryDirectory() as td:
            spread(Path(td))
    else:
        sys.exit(__doc__)
