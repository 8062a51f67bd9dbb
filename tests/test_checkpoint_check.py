"""A bad checkpoint fails before anything is built, in one line naming the file (and layer and
field): `submoe check`, `submoe eval`, and `vllm serve` through the plugin's check in the API server."""
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import EVAL

from submoe_format.check import check_checkpoint


def _shard(d):
    return sorted(d.glob("*.safetensors"))[0]


def _truncate(d):
    f = _shard(d)
    f.write_bytes(f.read_bytes()[:-100])


def _drop_tensor(d, name):
    from safetensors.torch import load_file, save_file
    f = next(f for f in sorted(d.glob("*.safetensors")) if name in load_file(f))
    tensors = load_file(f)
    del tensors[name]
    save_file(tensors, f)
    index = d / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        del data["weight_map"][name]
        index.write_text(json.dumps(data))


def _edit_config(change):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        change(config)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _map(layer, slot, value):
    return _edit_config(lambda c: c["submoe"]["layers"][layer]["expert_map"].__setitem__(slot, value))


def _list_missing_shard(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00009-of-00009.safetensors"}}))


EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
BREAKS = {
    "truncated shard": (_truncate, "{shard} is not a readable safetensors file"),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "mixtral",'),
                        "{config} is not valid JSON"),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), "{config} holds a JSON list"),
    "out-of-range id": (_map(1, 5, 7), r"config.json `submoe`.layers\[1\].expert_map\[5\] = 7 is outside 0..3"),
    "float id": (_map(0, 2, 1.0), r"layers\[0\].expert_map\[2\] = 1.0 is not an integer"),
    "negative id": (_map(0, 2, -1), r"layers\[0\].expert_map\[2\] = -1 is outside"),
    "map for a missing layer": (_edit_config(lambda c: c["submoe"]["layers"].append(c["submoe"]["layers"][0])),
                                r"one entry per decoder layer \(num_hidden_layers=2\), got 3"),
    "shapes disagree with config": (_edit_config(lambda c: c.update(intermediate_size=2 * c["intermediate_size"])),
                                    r"\.safetensors: tensor model\.layers\.\d\.block_sparse_moe\..* has shape"),
    "missing expert tensor": (lambda d: _drop_tensor(d, EXPERT), f"missing tensor\\(s\\) {EXPERT}"),
    "index names a missing shard": (_list_missing_shard, "lists model-00009-of-00009.safetensors, which is missing"),
    "format version 99": (_edit_config(lambda c: c["submoe"].update(format_version=99)), "format_version is 99"),
}


@pytest.fixture()
def broken(request, random_compressed, tmp_path):
    """A copy of the compressed random model with one thing broken; the pattern its error must match."""
    d = tmp_path / "ckpt"
    shutil.copytree(random_compressed, d)
    assert check_checkpoint(d).experts_per_layer == (4, 4)  # whole, it passes
    name = request.param
    break_it, message = BREAKS[name]
    shard, config = _shard(d), d / "config.json"
    break_it(d)
    return d, message.format(shard=str(shard), config=str(config))


def _run(argv):
    proc = subprocess.run([sys.executable, "-m", "submoe", *argv], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("broken", list(BREAKS), indirect=True)
def test_submoe_check_names_the_problem_in_one_line(broken):
    d, message = broken
    with pytest.raises(Exception, match=message):
        check_checkpoint(d)
    code, err = _run(["check", str(d)])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("submoe check: error: ") and str(d) in err[0]


@pytest.mark.parametrize("broken", ["truncated shard", "config not JSON"], indirect=True)
def test_submoe_eval_refuses_a_broken_file_in_one_line(broken):
    d, message = broken
    code, err = _run(["eval", "--model", str(d), "--data", EVAL[0], "--no-progress"])
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err


def test_submoe_check_names_a_path_that_is_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")  # a file given where its directory belongs
    for path in (tmp_path / "absent", tmp_path / "model.safetensors"):
        code, err = _run(["check", str(path)])
        assert code == 2 and err == [f"submoe check: error: {path} is not a directory: pass the checkpoint "
                                     f"directory `submoe compress` wrote"], err


def test_submoe_check_passes_a_good_checkpoint(random_compressed):
    proc = subprocess.run([sys.executable, "-m", "submoe", "check", str(random_compressed)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok, format 1" in proc.stdout and "2 MoE layers, 8 router experts -> 4-4" \
        in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.vllm
@pytest.mark.parametrize("broken", ["out-of-range id"], indirect=True)
def test_vllm_serve_refuses_a_bad_map_before_any_engine_starts(broken):
    """The plugin's check runs in the API server while vLLM builds its config: no engine core or
    worker is started (they used to, for about 100 s), and the last lines name the field."""
    from serving.launcher import vllm_executable
    d, message = broken
    proc = subprocess.run([vllm_executable(), "serve", str(d), "--port", "8177"], capture_output=True, text=True,
                          timeout=240)
    log = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0
    assert any("expert_map[5] = 7 is outside 0..3" in line for line in log[-4:]), log[-6:]
    assert not any("EngineCore" in line or "Worker" in line for line in log), "an engine was started"


@pytest.mark.vllm
def test_vllm_serve_refuses_fp8_where_vllm_has_no_fp8_kernels(random_compressed):
    """vLLM's CPU build has FP8 stubs only: `--quantization fp8` used to start the engine and die in the
    worker while quantising the first expert; the API server now says why, in seconds."""
    from serving.launcher import vllm_executable
    from vllm_submoe.models.preflight import ServingOptionError, check_quantization
    from vllm_submoe.vllm_compat import has_fp8_kernels
    check_quantization("fp8", fp8_kernels=True)  # a GPU build serves it
    check_quantization(None, fp8_kernels=False)
    with pytest.raises(ServingOptionError, match="no FP8 kernels"):
        check_quantization("fp8", fp8_kernels=False)
    if has_fp8_kernels():
        pytest.skip("this vLLM build has FP8 kernels: --quantization fp8 is served")
    proc = subprocess.run([vllm_executable(), "serve", str(random_compressed), "--port", "8179", "--quantization",
                           "fp8"], capture_output=True, text=True, timeout=240)
    log = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0
    assert any("--quantization fp8: this vLLM build has no FP8 kernels" in line for line in log[-4:]), log[-6:]
    assert not any("EngineCore" in line or "Worker" in line for line in log), "an engine was started"


@pytest.mark.vllm
def test_vllm_serve_refuses_expert_parallelism_on_the_cpu_build(random_compressed):
    """Stock vLLM's CPU fused-MoE kernel dies with a segmentation fault under expert parallelism (the
    source model too); the plugin refuses it while vLLM reads the arguments, before any engine starts."""
    from serving.launcher import vllm_executable
    from vllm_submoe.models.preflight import ServingOptionError, check_executor_backend, check_expert_parallel
    check_expert_parallel(True, cpu_build=False)  # a CUDA build runs it
    check_expert_parallel(False, cpu_build=True)
    with pytest.raises(ServingOptionError, match="cannot run expert parallelism"):
        check_expert_parallel(True, cpu_build=True)
    for backend in (None, "mp", "uni"):
        check_executor_backend(backend, cpu_build=True)
    check_executor_backend("ray", cpu_build=False)
    with pytest.raises(ServingOptionError, match="no Ray support"):  # stock vLLM fails in the engine core
        check_executor_backend("ray", cpu_build=True)
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA build serves expert parallelism (make gpu-check serves it on 2 GPUs)")
    proc = subprocess.run([vllm_executable(), "serve", str(random_compressed), "--port", "8181",
                           "--enable-expert-parallel", "--tensor-parallel-size", "2"],
                          capture_output=True, text=True, timeout=240)
    log = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode not in (0, -11), proc.returncode  # -11: SIGSEGV
    assert any("--enable-expert-parallel: vLLM's CPU build cannot run expert parallelism" in line
               for line in log[-4:]), log[-6:]
    assert not any("EngineCore" in line or "Worker" in line for line in log), "an engine was started"


def test_a_tokenizer_beyond_the_vocabulary_is_refused_in_one_line(tmp_path):
    """A 2048-token model beside the shipped 4096-token tokenizer: compress and eval used to die
    with a raw IndexError inside the embedding."""
    from conftest import CALIB, SHIPPED

    from offline.synthetic import random_mixtral
    src = random_mixtral(tmp_path / "small-vocab", SHIPPED, vocab=2048)
    want = f"the tokenizer in {src} gives token id \\d+, but the model's vocab_size is 2048"
    for argv in (["compress", "--model", str(src), "--out", str(tmp_path / "out"), "--method", "submoe", "--num-experts", "4",
                  "--calib", CALIB[0], "--samples", "4", "--seq-len", "64", "--no-progress"],
                 ["eval", "--model", str(src), "--data", EVAL[0], "--no-progress"]):
        code, err = _run(argv)
        assert code == 2 and len(err) == 1 and re.search(want, err[0]), err
    assert not (tmp_path / "out").exists()
