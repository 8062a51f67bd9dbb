"""vLLM (through the plugin) computes what the torch reference computes, and refuses bad checkpoints.

Engines are expensive (~40 s each on 2 cores): one `vllm serve` for the module, and one
subprocess per offline engine.
"""
import json
import shutil
import urllib.request

import openai
import pytest

from conftest import CALIB, SHIPPED, write_config
from offline.compress import CompressOptions, compress
from offline.evaluate import load_reference
from serving.launcher import ServerError, VLLMServer
from serving.scrape import compression_gauges
from vllm_submoe.checkpoint_format import make_block
from vllm_helpers import reference_greedy, run_vllm, vllm_results

pytestmark = pytest.mark.vllm
MAX_TOKENS = 12
LOGPROB_ATOL = 2e-3  # float32 both sides; different kernels and summation order


def assert_matches_reference(got: dict, ref: dict) -> None:
    """Prompt logprobs close at every position; greedy tokens identical (unless the reference
    itself is at a near-tie, where the continuations may legitimately part) with close logprobs."""
    assert len(got["prompt_logprobs"]) == len(ref["prompt_logprobs"])
    for i, (a, b) in enumerate(zip(got["prompt_logprobs"], ref["prompt_logprobs"])):
        if b is not None:
            assert a == pytest.approx(b, abs=LOGPROB_ATOL), f"prompt position {i}"
    for i, (a, b) in enumerate(zip(got["token_ids"], ref["token_ids"])):
        if a != b:
            assert ref["gaps"][i] < LOGPROB_ATOL, f"step {i}: vLLM chose {a}, reference {b} (gap {ref['gaps'][i]:.4f})"
            return
        assert got["logprobs"][i] == pytest.approx(ref["logprobs"][i], abs=LOGPROB_ATOL), f"step {i}"


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    """The shipped model compressed with a different expert count in every layer."""
    out = tmp_path_factory.mktemp("hetero") / "tiny-submoe-hetero"
    compress(CompressOptions(model=str(SHIPPED), out=out, method="submoe", num_experts=[6, 4, 3, 5],
                             calib=CALIB, samples=16, seq_len=128, progress=False))
    return out


@pytest.fixture(scope="module")
def server(hetero, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with VLLMServer(str(hetero), "--dtype", "float32", "--max-model-len", "512", model_flag=True,
                    log_path=log) as s:
        yield s


def test_served_compressed_model_equals_reference_forward(server, hetero, prompts):
    ref_model = load_reference(str(hetero))
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    for p in prompts:
        r = client.completions.create(model=str(hetero), prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                      logprobs=1, extra_body={"return_token_ids": True, "prompt_logprobs": 1, "ignore_eos": True})
        c = r.choices[0]
        prompt_lp = [None if d is None else d[str(t)]["logprob"] for d, t in zip(c.prompt_logprobs, p)]
        got = {"token_ids": c.token_ids, "logprobs": c.logprobs.token_logprobs, "prompt_logprobs": prompt_lp}
        assert len(got["token_ids"]) == MAX_TOKENS
        assert_matches_reference(got, reference_greedy(ref_model, p, MAX_TOKENS))


def test_metrics_export_compression_facts(server, hetero):
    gauges = compression_gauges(server.base_url)
    report = json.loads((hetero / "compression_report.json").read_text())
    config = json.loads((hetero / "config.json").read_text())
    assert gauges["experts_per_layer"] == [6, 4, 3, 5]
    assert gauges["weight_bytes"] == report["sizes"]["weight_bytes"]
    assert gauges["compression_ratio"] == pytest.approx(report["sizes"]["compression_ratio"])
    assert gauges["expert_parameters"] == 18 * 3 * config["hidden_size"] * config["intermediate_size"]
    assert gauges["expert_bytes"] == 4 * gauges["expert_parameters"]  # served in float32
    text = urllib.request.urlopen(f"{server.base_url}/metrics").read().decode()
    assert "vllm:time_to_first_token_seconds_count" in text  # vLLM's own histograms sit beside ours


def test_chat_endpoint_answers(server, hetero):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    r = client.chat.completions.create(model=str(hetero), messages=[{"role": "user", "content": "Guten Tag"}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens > 0


def _identity_copy(src, dst):
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    n, layers = config["num_local_experts"], config["num_hidden_layers"]
    write_config(dst, architectures=["SubMoEMixtralForCausalLM"], submoe=make_block(
        "identity", {"architecture": "MixtralForCausalLM", "num_experts": n}, n, [list(range(n))] * layers))
    return dst


def test_identity_map_equals_stock_vllm_serving_the_source(tmp_path, prompts):
    identity = _identity_copy(SHIPPED, tmp_path / "identity")
    stock = vllm_results(SHIPPED, prompts, tmp_path / "stock", MAX_TOKENS)
    ours = vllm_results(identity, prompts, tmp_path / "ours", MAX_TOKENS)
    for a, b in zip(ours, stock):
        assert a["token_ids"] == b["token_ids"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
        assert a["prompt_logprobs"][1:] == pytest.approx(b["prompt_logprobs"][1:], abs=1e-5)


def _break_map(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["submoe"]["layers"][2]["expert_map"][3] = 8  # one past the last expert: would corrupt memory
    (ckpt / "config.json").write_text(json.dumps(config))


def _transpose_one_expert(ckpt):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    tensors[name] = tensors[name].T.contiguous()
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (_break_map, "`submoe`.layers[2].expert_map[3] = 8 is outside 0..7"),
    (_transpose_one_expert, "tensor model.layers.1.block_sparse_moe.experts.5.w2.weight has shape (384, 256), "
                            "expected (256, 384)"),
])
def test_bad_checkpoint_is_refused_at_load_with_a_clear_error(tmp_path, damage, message):
    bad = _identity_copy(SHIPPED, tmp_path / "bad")
    damage(bad)
    proc = run_vllm(bad, [[1, 2, 3]], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


def test_launcher_reports_a_failed_start_and_leaves_nothing_running(tmp_path):
    import psutil
    server = VLLMServer(str(tmp_path / "no-such-model"), log_path=tmp_path / "serve.log")
    with pytest.raises(ServerError, match="vllm serve exited with"):
        server.start()
    assert server.proc is None
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]


def test_plugin_registration_is_idempotent():
    import importlib.metadata as md

    import vllm_submoe
    (entry,) = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "submoe"]
    assert entry.load() is vllm_submoe.register
    from vllm import ModelRegistry
    vllm_submoe.register()
    vllm_submoe.register()
    assert "SubMoEMixtralForCausalLM" in ModelRegistry.get_supported_archs()
    (stat,) = [e for e in md.entry_points(group="vllm.stat_logger_plugins") if e.name == "submoe"]
    from vllm.v1.metrics.loggers import StatLoggerBase
    assert issubclass(stat.load(), StatLoggerBase)
