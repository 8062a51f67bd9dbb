"""vLLM (through the plugin) computes what the torch reference computes, and refuses bad checkpoints.

Engines are expensive (~40 s each on 2 cores): one `vllm serve` for the module, and one
subprocess per offline engine.
"""
import json
import math
import urllib.error
import urllib.request

import openai
import pytest
from conftest import CALIB, SHIPPED
from vllm_helpers import assert_matches_reference, assert_same_serving, identity_copy, reference_greedy, run_vllm, vllm_results

from offline.compress import compress
from offline.evaluate import load_reference
from offline.options import CompressOptions
from serving.launcher import ServerError, VLLMServer
from serving.scrape import compression_gauges, metric_samples

pytestmark = pytest.mark.vllm
MAX_TOKENS = 12
API_KEY = "test-key"  # the module server requires it on /v1 (vLLM's --api-key, through the launcher)


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
                    log_path=log, api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def test_served_compressed_model_equals_reference_forward(client, hetero, prompts):
    ref_model = load_reference(str(hetero))
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


def test_chat_endpoint_answers(client, hetero):
    r = client.chat.completions.create(model=str(hetero), messages=[{"role": "user", "content": "Guten Tag"}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens > 0


def test_identity_map_equals_stock_vllm_serving_the_source(tmp_path, prompts):
    identity = identity_copy(SHIPPED, tmp_path / "identity")
    both = vllm_results([SHIPPED, identity], prompts, tmp_path / "run", MAX_TOKENS)
    assert_same_serving(both[str(identity)], both[str(SHIPPED)])


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
    bad = identity_copy(SHIPPED, tmp_path / "bad")
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


def test_plugin_registration_is_idempotent(monkeypatch):
    """The entry point is `register`; a first call registers each plugin class exactly once, a second
    registers nothing; the targets resolve to the classes generated from the family table. (No engine.)"""
    import importlib.metadata as md
    from types import SimpleNamespace

    import vllm_submoe
    from submoe_format.families import FAMILIES
    (entry,) = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "submoe"]
    assert entry.load() is vllm_submoe.register
    from vllm import ModelRegistry
    plugin_archs = {f.plugin_architecture for f in FAMILIES}
    assert set(vllm_submoe.MODEL_CLASSES) == plugin_archs
    # start from a registry without the plugin's classes (vLLM may have loaded the plugin already)
    monkeypatch.setattr(ModelRegistry, "models", {k: v for k, v in ModelRegistry.models.items()
                                                  if k not in plugin_archs})
    calls = []
    register_model = ModelRegistry.register_model
    monkeypatch.setattr(ModelRegistry, "register_model",
                        lambda arch, cls: (calls.append((arch, cls)), register_model(arch, cls))[-1])
    vllm_submoe.register()
    assert sorted(arch for arch, _ in calls) == sorted(plugin_archs)  # each exactly once
    assert dict(calls) == vllm_submoe.MODEL_CLASSES
    calls.clear()
    vllm_submoe.register()
    assert calls == []
    assert plugin_archs <= set(ModelRegistry.get_supported_archs())
    import vllm_submoe.models.classes as generated
    from vllm_submoe.models.remapped_moe import SubMoEModel
    config = SimpleNamespace(model_impl="auto", convert_type="none", runner_type="generate")
    for family in FAMILIES:
        cls, arch = ModelRegistry.resolve_model_cls([family.plugin_architecture], model_config=config)
        assert arch == family.plugin_architecture and cls is getattr(generated, arch)
        assert issubclass(cls, SubMoEModel) and cls.__mro__[2].__name__ == family.source_architecture
        assert cls.arch_module.__name__ == f"vllm.model_executor.models.{family.vllm_module}"
    (stat,) = [e for e in md.entry_points(group="vllm.stat_logger_plugins") if e.name == "submoe"]
    from vllm.v1.metrics.loggers import StatLoggerBase
    assert issubclass(stat.load(), StatLoggerBase)


def _post(server, path, body: bytes, key: str | None = API_KEY) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{server.base_url}{path}", data=body, headers=headers),
                                    timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _completion(hetero, **fields) -> bytes:
    return json.dumps({"model": str(hetero), "prompt": [5, 6, 7], "max_tokens": 2, **fields}).encode()


def test_requests_without_the_api_key_are_refused(server, hetero):
    assert _post(server, "/v1/completions", _completion(hetero), key=None) == 401
    assert _post(server, "/v1/completions", _completion(hetero), key="wrong") == 401
    assert _post(server, "/v1/completions", _completion(hetero)) == 200


@pytest.mark.parametrize("case, body, status", [
    ("prompt longer than the context", lambda h: _completion(h, prompt=list(range(5, 605))), 400),
    ("negative temperature", lambda h: _completion(h, temperature=-1.0), 400),
    ("top_p above 1", lambda h: _completion(h, top_p=2.0), 400),
    ("negative max_tokens", lambda h: _completion(h, max_tokens=-3), 400),
    ("malformed JSON", lambda h: b'{"model": "x", "prompt": [1, 2', 400),
    ("unknown model name", lambda h: json.dumps({"model": "no-such-model", "prompt": "hi", "max_tokens": 2}).encode(), 404),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, hetero, case, body, status):
    got = _post(server, "/v1/completions", body(hetero))
    assert 400 <= got < 500, f"{case}: HTTP {got}"
    assert got == status, f"{case}: HTTP {got}, expected {status}"
    assert _post(server, "/v1/completions", _completion(hetero)) == 200, f"server stopped serving after: {case}"


def test_compression_route_describes_the_served_checkpoint(server, hetero):
    from vllm_submoe.endpoint import ROUTE, describe
    doc = json.loads(urllib.request.urlopen(f"{server.base_url}{ROUTE}").read())
    expected = describe(json.loads((hetero / "config.json").read_text()), str(hetero), served_dtype_bytes=4)
    assert doc == json.loads(json.dumps(expected))
    assert doc["method"] == "submoe" and doc["experts_per_layer"] == [6, 4, 3, 5]


def test_grafana_dashboard_queries_only_metrics_the_server_exports(server, client, hetero):
    import re

    from conftest import ROOT
    client.completions.create(model=str(hetero), prompt=[5, 6, 7], max_tokens=2)  # histograms have samples
    dashboard = json.loads((ROOT / "serving" / "grafana" / "vllm-submoe-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(vllm:[a-z0-9_]+|submoe_[a-z0-9_]+)", e)}
    exported = {s.name for s in metric_samples(server.base_url)}
    assert {"submoe_experts", "vllm:time_to_first_token_seconds_bucket"} <= used
    assert not used - exported, f"dashboard queries metrics the server does not export: {used - exported}"


def test_loadtest_short_real_run_against_a_url_and_a_launched_directory(server, tmp_path):
    """`submoe loadtest`: the compressed module server by URL, the shipped model launched for the run."""
    from conftest import EVAL

    from serving.loadtest.cli import LoadTestOptions, run
    opts = LoadTestOptions(targets=[server.base_url, str(SHIPPED)], labels=["compressed", "original"], data=EVAL,
                           out=tmp_path / "lt", concurrency=[1, 4], requests=8, rate=4.0, rate_requests=8,
                           max_tokens=6, prompt_length=120, quality_prompts=4, api_key=API_KEY,
                           serve_args=["--dtype", "float32", "--max-model-len", "512"], progress=False)
    result = run(opts)
    compressed, original = result["deployments"]
    for d in (compressed, original):
        for phase in d["closed_loop"] + [d["open_loop"]]:
            assert phase["errors"] == 0 and phase["completed"] == 8
            assert phase["output_tokens"] == 8 * 6  # ignore_eos: every request decodes max_tokens
            assert 0 < phase["ttft_s"]["p50"] <= phase["e2e_s"]["p50"]
        assert [p["concurrency"] for p in d["closed_loop"]] == [1, 4]
    assert compressed["compression"]["experts_per_layer"] == [6, 4, 3, 5]
    assert original["compression"]["experts_per_layer"] == [8, 8, 8, 8]
    assert compressed["description"]["method"] == "submoe" and original["description"]["compressed"] is False
    assert compressed["memory"]["idle_pss_bytes"] is None  # a URL: no processes of ours to measure
    assert original["memory"]["idle_pss_bytes"] > original["compression"]["weight_bytes"]
    assert original["startup_s"] > 0 and compressed["startup_s"] is None
    q = original["quality"]
    assert q["comparable"] and 0 < q["top1_agreement"] < 1 and math.isfinite(q["perplexity"])
    saved = json.loads((tmp_path / "lt" / "loadtest.json").read_text())
    assert len(saved["ratios"]) == 2 and (tmp_path / "lt" / "loadtest.png").stat().st_size > 0


def test_loadtest_interleaved_rounds_on_a_running_server(server, tmp_path):
    """`submoe loadtest --rounds 3` against two deployments (the same server twice, by URL): every
    round measures both at every level, the ratio is taken within each round, and the pooled
    closed loop holds every round's requests."""
    from conftest import EVAL

    from submoe.cli import main
    out = tmp_path / "rounds"
    code = main(["loadtest", server.base_url, server.base_url, "--labels", "a,b", "--data", *EVAL, "--rounds", "3",
                 "--concurrency", "1,2", "--requests", "2", "--max-tokens", "4", "--prompt-length", "80",
                 "--quality-prompts", "2", "--api-key", API_KEY, "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads((out / "loadtest.json").read_text())
    a, b = result["deployments"]
    for d in (a, b):
        assert [(e["round"], e["concurrency"]) for e in d["rounds"]] == [(r, c) for r in range(3) for c in (1, 2)]
        assert all(e["errors"] == 0 and e["output_tokens_per_s"] > 0 for e in d["rounds"])
        assert [p["completed"] for p in d["closed_loop"]] == [3 * 2, 3 * 2]
        assert all(p["output_tokens"] == 3 * 2 * 4 for p in d["closed_loop"])
    assert [e["position"] for e in b["rounds"]] == [1, 1, 0, 0, 1, 1]  # b goes first in the second round
    (versus,) = result["interleaved"]
    assert versus["label"] == "b" and versus["versus"] == "a"
    for row in versus["ratios"]:
        tok = row["output_tokens_per_s"]
        assert tok["rounds"] == 3 and tok["min"] <= tok["median"] <= tok["max"]
        assert tok["per_round"] == pytest.approx([y["output_tokens_per_s"] / x["output_tokens_per_s"] for x, y in zip(
            [e for e in a["rounds"] if e["concurrency"] == row["concurrency"]],
            [e for e in b["rounds"] if e["concurrency"] == row["concurrency"]])])
    assert "interleaved rounds" in (out / "loadtest.md").read_text()
