"""`--export profile`: a compression that stores only what changed and is served from its unchanged source.

The shipped model (copied, so that a test may change its files) is calibrated once and compressed four
ways: REAP and output-lsq, each as a remap export and as a profile. One vLLM subprocess serves all four.
"""
import json
import shutil

import pytest
from conftest import CALIB, SHIPPED
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vllm_helpers import assert_same_serving, vllm_results

from offline.calibrate import calibrate
from offline.calibration.settings import CalibrateOptions
from offline.compress import compress
from offline.options import CompressError, CompressOptions
from offline.source.checkpoint import LazyCheckpoint
from serving.launcher import ServerError, VLLMServer
from submoe_format.check import check_checkpoint
from submoe_format.checkpoint import BLOCK_KEY, CheckpointFormatError, layout_for
from vllm_submoe.metrics import compression_facts

RUNS = [(m, e) for m in ("reap", "output-lsq") for e in ("remap", "profile")]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return shutil.copytree(SHIPPED, tmp_path_factory.mktemp("profile-source") / "tiny-mixtral-8e")


@pytest.fixture(scope="module")
def outs(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    calibrate(CalibrateOptions(model=str(source), out=root / "stats", calib=CALIB[:2], samples=16, seq_len=64,
                               progress=False))
    for method, export in RUNS:
        compress(CompressOptions(model=str(source), out=root / f"{method}-{export}", method=method, num_experts=4,
                                 export=export, stats=str(root / "stats"), progress=False))
    return {run: root / f"{run[0]}-{run[1]}" for run in RUNS}


def stored_tensors(directory):
    names = []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            names += list(h.keys())
    return names


def test_a_pruning_profile_stores_no_tensor_and_a_merge_only_changed_experts(outs, source):
    config = json.loads((outs["reap", "profile"] / "config.json").read_text())
    assert config[BLOCK_KEY]["format_version"] == 3
    assert config[BLOCK_KEY]["profile"]["path"] == str(source.resolve())
    assert list(outs["reap", "profile"].glob("*.safetensors")) and stored_tensors(outs["reap", "profile"]) == []
    layout = layout_for(config)
    merged = stored_tensors(outs["output-lsq", "profile"])
    assert merged and all(layout.is_expert_tensor(n) for n in merged)
    assert len(merged) < len(stored_tensors(outs["output-lsq", "remap"]))
    report = json.loads((outs["output-lsq", "profile"] / "compression_report.json").read_text())["sizes"]
    assert report["written_bytes"] < report["weight_bytes"]
    check_checkpoint(outs["output-lsq", "profile"])


@pytest.mark.parametrize("method", ["reap", "output-lsq"])
def test_a_profile_reads_and_reports_as_its_remap_export(outs, method):
    remap, profile = (outs[method, e] for e in ("remap", "profile"))
    a, b = LazyCheckpoint(remap), LazyCheckpoint(profile)
    assert sorted(b.names()) == sorted(a.names())
    assert all(b.get(n).equal(a.get(n)) for n in a.names())
    facts = [compression_facts(json.loads((d / "config.json").read_text()), str(d)) for d in (remap, profile)]
    assert facts[0] == facts[1]  # what /metrics exports: the weight bytes served, not stored


@pytest.mark.vllm
def test_a_profile_is_served_as_its_remap_export(outs, prompts, tmp_path):
    served = vllm_results([outs[run] for run in RUNS], prompts, tmp_path, 12, "--enforce-eager")  # loading is the point
    for method in ("reap", "output-lsq"):
        assert_same_serving(served[str(outs[method, "profile"])], served[str(outs[method, "remap"])], atol=1e-5)


def test_a_profile_of_a_profile_is_refused(outs, tmp_path):
    with pytest.raises(CompressError, match="already a compressed checkpoint"):
        compress(CompressOptions(model=str(outs["reap", "profile"]), out=tmp_path / "again", method="reap",
                                 num_experts=2, export="profile", calib=CALIB[:1], samples=4, seq_len=32,
                                 progress=False))


def _grow(shard):
    with shard.open("ab") as f:
        f.write(b"\0" * 8)


def _rename_a_tensor(shard):  # same size, another header
    tensors = load_file(str(shard))
    tensors["model.norm.weighx"] = tensors.pop("model.norm.weight")
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (_grow, r"changed since the profile was written \(\d+ bytes, was \d+\)"),
    (_rename_a_tensor, r"changed since the profile was written \(its safetensors header differs\)"),
    (lambda shard: shard.unlink(), "is missing"),
])
def test_a_changed_or_missing_source_file_is_refused_naming_it(source, tmp_path, change, message):
    src = shutil.copytree(source, tmp_path / "src")
    compress(CompressOptions(model=str(src), out=tmp_path / "p", method="reap", num_experts=4, export="profile",
                             calib=CALIB[:1], samples=4, seq_len=32, progress=False))
    check_checkpoint(tmp_path / "p")
    shard = next(src.glob("*.safetensors"))
    size = shard.stat().st_size
    change(shard)
    assert not shard.exists() or (shard.stat().st_size == size) == (change is _rename_a_tensor)
    with pytest.raises(CheckpointFormatError, match=message) as e:
        check_checkpoint(tmp_path / "p")
    assert str(shard) in str(e.value) and "compress again" in str(e.value)


@pytest.mark.vllm
def test_vllm_serve_refuses_a_profile_whose_source_changed(outs, source, tmp_path):
    """Refused in the API server, before an engine starts: the log's last lines name the file."""
    src = shutil.copytree(source, tmp_path / "src")
    compress(CompressOptions(model=str(src), out=tmp_path / "p", method="reap", num_experts=4, export="profile",
                             calib=CALIB[:1], samples=4, seq_len=32, progress=False))
    shard = next(src.glob("*.safetensors"))
    _grow(shard)
    with pytest.raises(ServerError) as e:
        VLLMServer(str(tmp_path / "p"), log_path=tmp_path / "serve.log").start()
    assert f"the profile's source file {shard} changed" in "\n".join(str(e.value).splitlines()[-5:])
