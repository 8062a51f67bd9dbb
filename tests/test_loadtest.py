"""The load tester's parts without a server: timings on a scripted clock, statistics on
recorded traces, the drivers' scheduling, the report writer, and the server-side probes."""
import asyncio
import json
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
from conftest import EVAL, SHIPPED

from serving.launcher import VLLMServer, plugins_with_compression_route
from serving.loadtest import probes, report
from serving.loadtest.records import RequestRecord, growth, percentiles, summarize
from serving.loadtest.runner import closed_loop, open_loop, stream_completion
from serving.loadtest.workload import held_out_prompts, poisson_arrivals
from vllm_submoe.endpoint import describe


class ScriptedClock:
    """Returns the scripted times in order: the test knows every instant the code reads."""

    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def chunk(text=None, usage=None):
    choices = [SimpleNamespace(text=text)] if text is not None else []
    return SimpleNamespace(choices=choices, usage=usage)


class FakeClient:
    """`client.completions.create(stream=True)` yielding the given chunks (or raising)."""

    def __init__(self, chunks=(), error=None):
        self.chunks, self.error, self.calls = list(chunks), error, []

        async def create(**kwargs):
            self.calls.append(kwargs)
            if self.error:
                raise self.error

            async def stream():
                for c in self.chunks:
                    yield c
            return stream()
        self.completions = SimpleNamespace(create=create)


def test_stream_completion_times_first_token_gaps_and_end_on_the_clock():
    usage = SimpleNamespace(completion_tokens=3, prompt_tokens=7)
    # a token whose text is empty (special token, half a character) still arrives; the usage
    # chunk carries no choice and is not a token
    client = FakeClient([chunk("a"), chunk(""), chunk("b"), chunk("c"), chunk(usage=usage)])
    clock = ScriptedClock([10.0, 10.5, 10.6, 10.7, 11.0, 11.25])  # start, one read per token, end
    r = asyncio.run(stream_completion(client, "m", "prompt", 4, clock=clock))
    assert r.ok and r.output_tokens == 3 and r.prompt_tokens == 7
    assert r.ttft == pytest.approx(0.5)
    assert r.inter_token_latencies == pytest.approx([0.1, 0.1, 0.3])
    assert r.e2e == pytest.approx(1.25)
    (call,) = client.calls
    assert call["stream"] and call["max_tokens"] == 4 and call["extra_body"] == {"ignore_eos": True}


def test_stream_completion_records_failures_instead_of_raising():
    refused = openai.APIConnectionError(request=httpx.Request("POST", "http://x"))
    r = asyncio.run(stream_completion(FakeClient(error=refused), "m", "p", 4, clock=ScriptedClock([0.0, 2.0])))
    assert not r.ok and r.error.startswith("APIConnectionError") and r.e2e == 2.0
    empty = asyncio.run(stream_completion(FakeClient([chunk(usage=None)]), "m", "p", 4, clock=ScriptedClock([0, 1])))
    assert empty.error.startswith("EmptyResponse")


def _trace():
    """100 successful requests with TTFT 1..100 ms, two tokens 10 ms apart, and 3 failures."""
    ok = [RequestRecord(start=0.0, end=i / 1e3 + 0.01, chunk_times=[i / 1e3, i / 1e3 + 0.01], output_tokens=2,
                        prompt_tokens=5) for i in range(1, 101)]
    bad = [RequestRecord(start=0.0, end=0.1, error="APIStatusError: 400"),
           RequestRecord(start=0.0, end=0.1, error="APIStatusError: 400"),
           RequestRecord(start=0.0, end=0.1, error="APITimeoutError: timed out")]
    return ok + bad


def test_summary_of_a_recorded_trace():
    s = summarize(_trace(), duration=4.0)
    assert (s["requests"], s["completed"], s["errors"]) == (103, 100, 3)
    assert s["error_kinds"] == {"APIStatusError": 2, "APITimeoutError": 1}
    assert s["requests_per_s"] == 25.0 and s["output_tokens_per_s"] == 50.0 and s["prompt_tokens"] == 500
    # linear interpolation over 1..100 ms: p50 = 50.5, p90 = 90.1, p99 = 99.01 (failures excluded)
    assert s["ttft_s"]["p50"] == pytest.approx(0.0505) and s["ttft_s"]["p90"] == pytest.approx(0.0901)
    assert s["ttft_s"]["p99"] == pytest.approx(0.09901)
    assert s["itl_s"] == pytest.approx({"p50": 0.01, "p90": 0.01, "p99": 0.01, "mean": 0.01})
    assert s["e2e_s"]["mean"] == pytest.approx(0.0605)


def test_statistics_refuse_or_survive_degenerate_input():
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    only_failures = summarize(_trace()[-3:], duration=1.0)
    assert only_failures["completed"] == 0 and only_failures["ttft_s"]["p50"] is None
    with pytest.raises(ValueError, match="duration"):
        summarize(_trace(), duration=0)


def test_memory_growth_ignores_warm_up_and_sees_a_leak():
    warm_then_flat = [50, 80, 100, 100.5, 99, 100.2, 100, 100.1, 100, 100]
    assert abs(growth(warm_then_flat)) < 0.01
    leak = [100 + 2 * i for i in range(10)]  # steady growth after warm-up
    assert growth(leak) == pytest.approx(118 / 104 - 1)
    assert growth([1.0]) is None


def test_closed_loop_keeps_exactly_n_requests_in_flight_and_sends_each_prompt_once():
    in_flight, peak, sent = 0, 0, []

    async def send(prompt):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        sent.append(prompt)
        await asyncio.sleep(0.001 * (prompt % 3))
        in_flight -= 1
        return RequestRecord(start=0, end=1, chunk_times=[0.5], output_tokens=prompt)

    done = []
    records, duration = asyncio.run(closed_loop(send, list(range(40)), concurrency=6, on_done=done.append))
    assert peak == 6 and sorted(sent) == list(range(40)) and len(done) == 40
    assert [r.output_tokens for r in records] == list(range(40))  # records in prompt order
    assert duration > 0
    _, _ = asyncio.run(closed_loop(send, [1, 2], concurrency=64))
    assert peak == 6  # never more users than prompts


def test_open_loop_sends_each_request_at_its_arrival_time_whatever_is_in_flight():
    now = [100.0]
    slept, started = [], []

    async def sleep(dt):  # virtual time: sleeping moves the clock
        slept.append(dt)
        now[0] += dt
        await asyncio.sleep(0)

    async def send(prompt):
        started.append((prompt, now[0]))
        return RequestRecord(start=now[0], end=now[0] + 5, chunk_times=[now[0] + 1], output_tokens=1)

    arrivals = [0.0, 0.25, 1.0]
    records, _ = asyncio.run(open_loop(send, ["a", "b", "c"], arrivals, clock=lambda: now[0], sleep=sleep))
    assert len(records) == 3 and [p for p, _ in started] == ["a", "b", "c"]
    assert slept[0] == 0.0 and all(dt >= 0 for dt in slept)
    with pytest.raises(ValueError, match="2 arrival times for 3 prompts"):
        asyncio.run(open_loop(send, ["a", "b", "c"], [0.0, 1.0]))


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate():
    a = poisson_arrivals(5000, rate=4.0, seed=1)
    assert a == poisson_arrivals(5000, rate=4.0, seed=1) and a != poisson_arrivals(5000, rate=4.0, seed=2)
    assert np.all(np.diff(a) > 0)
    assert 5000 / a[-1] == pytest.approx(4.0, rel=0.05)
    with pytest.raises(ValueError, match="rate must be > 0"):
        poisson_arrivals(3, 0)


def test_held_out_prompts_are_fixed_by_the_seed_and_cut_to_length():
    a = held_out_prompts(EVAL, 16, 200, seed=3)
    assert a == held_out_prompts(EVAL, 16, 200, seed=3) and a != held_out_prompts(EVAL, 16, 200, seed=4)
    assert all(len(p) == 200 for p in a)
    from transformers import AutoTokenizer
    ids = held_out_prompts(EVAL, 8, 300, seed=0, tokenizer=AutoTokenizer.from_pretrained(str(SHIPPED)))
    assert all(isinstance(p, list) and len(p) == 300 for p in ids)


def _scored(top1, logprobs, ids=None):
    return [{"token_ids": ids or list(range(len(top1))), "top1": top1, "logprobs": logprobs}]


def test_perplexity_and_agreement_between_two_deployments():
    ref = _scored([1, 2, 3, 4], [-1.0, -2.0, -1.0, -2.0])
    other = _scored([1, 2, 0, 4], [-1.5, -2.0, -1.0, -1.0])
    assert probes.perplexity(ref) == pytest.approx(math.exp(1.5))
    a = probes.agreement(ref, other)
    assert a["top1_agreement"] == 0.75 and a["mean_abs_logprob_diff"] == pytest.approx(1.5 / 4)
    assert probes.agreement(ref, ref)["top1_agreement"] == 1.0
    mismatch = probes.agreement(ref, _scored([1, 2, 3, 4], [0, 0, 0, 0], ids=[9, 9, 9, 9]))
    assert mismatch == {"comparable": False, "reason": "the deployments tokenize the prompts differently"}


def test_server_memory_sums_the_whole_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(60)"])
    try:
        parent_only = probes.server_memory(child.pid)
        assert parent_only["processes"] == 1
        import time
        time.sleep(1.0)
        m = probes.server_memory(child.pid)
        assert m["rss_bytes"] > 64 << 20 and 0 < m["pss_bytes"] <= m["rss_bytes"]
        assert m["gpu_bytes"] in (None, 0)
    finally:
        child.kill()
        child.wait()


def _result():
    """Two deployments; the second has twice the throughput and half the TTFT at both levels."""
    def level(c, speed):
        recs = [RequestRecord(start=0, end=1 / speed, chunk_times=[0.1 / speed, 0.2 / speed], output_tokens=2)
                for _ in range(8)]
        return {"concurrency": c, **summarize(recs, duration=1.0 / speed)}
    dep = lambda label, speed, experts: {  # noqa: E731
        "label": label, "closed_loop": [level(1, speed), level(4, speed)],
        "compression": {"experts_per_layer": experts, "weight_bytes": 100 << 20},
        "memory": {"idle_pss_bytes": 200 << 20, "peak_pss_bytes": 250 << 20},
        "quality": {"perplexity": 12.5, "top1_agreement": 0.9},
        "soak": {"requests": 1000, "concurrency": 32, "errors": 0, "memory_growth": 0.012,
                 "memory_after_warmup": 200 << 20, "memory_peak": 203 << 20}}
    return {"config": {"concurrency": [1, 4], "rate": None, "max_tokens": 2, "prompts": 8, "prompt_length": 40,
                       "prompt_unit": "characters"},
            "deployments": [dep("original", 1.0, [8, 8]), dep("compressed", 2.0, [4, 4])]}


def test_report_writer_outputs_json_markdown_and_plot(tmp_path):
    paths = report.write(_result(), tmp_path / "new-dir")
    data = json.loads(paths["json"].read_text())
    assert [(r["concurrency"], r["output_tokens_per_s"], r["ttft_p50"]) for r in data["ratios"]] == \
        [(1, 2.0, 0.5), (4, 2.0, 0.5)]
    md = paths["markdown"].read_text()
    assert "| compressed | 4 | 2.000 | 0.500 |" in md
    assert "1000 requests at concurrency 32: 0 failed" in md and "+1.20%" in md
    import matplotlib.image
    assert matplotlib.image.imread(paths["plot"]).shape[1] > 1000
    table = report.summary_table(_result())
    assert table.count("compressed") == 2 and "original" in table


def test_deployments_up_at_once_share_a_gpu_unless_the_user_chose():
    from serving.loadtest.cli import gpu_share
    assert gpu_share(["--max-model-len", "1024"], 3, on_gpu=True) == ["--gpu-memory-utilization", "0.300"]
    assert gpu_share(["--gpu-memory-utilization=0.5"], 3, on_gpu=True) == []
    assert gpu_share([], 3, on_gpu=False) == [] == gpu_share([], 1, on_gpu=True)


def test_launcher_binds_localhost_passes_the_api_key_and_opts_in_to_the_route():
    s = VLLMServer("some/model", "--dtype", "float32", api_key="k3y")
    cmd = s.command()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--api-key") + 1] == "k3y" and s.headers == {"Authorization": "Bearer k3y"}
    assert "submoe" in s.env["VLLM_PLUGINS"].split(",")
    assert VLLMServer("m", host="0.0.0.0").base_url.startswith("http://127.0.0.1:")
    assert "VLLM_CPU_KVCACHE_SPACE" in s.env  # the launcher's default KV space on CPU ...
    assert "VLLM_CPU_KVCACHE_SPACE" not in VLLMServer("m", "--kv-cache-memory-bytes", "64M").env  # ... unless asked
    assert plugins_with_compression_route("other") == "other,submoe"
    assert plugins_with_compression_route("submoe,other") == "submoe,other"
    installed = plugins_with_compression_route(None).split(",")
    assert "submoe" in installed and installed.count("submoe") == 1


def test_cpu_workers_get_the_thread_binding_vllm_needs(monkeypatch):
    """vLLM's CPU build binds each worker to a NUMA node of its own and refuses more workers than nodes:
    the launcher splits the CPUs between the workers instead, unless the user chose a binding."""
    from serving.launcher import ServerError, cpu_thread_binding, parallel_world_size
    assert parallel_world_size(["--dtype", "float32"]) == 1
    assert parallel_world_size(["-tp", "2", "--pipeline-parallel-size=2"]) == 4
    assert parallel_world_size(["--tensor-parallel-size", "2", "--data-parallel-size", "3"]) == 6
    assert cpu_thread_binding(2, cpus=[0, 1], nodes=1) == "0|1"
    assert cpu_thread_binding(2, cpus=[7, 4, 5, 6, 3], nodes=1) == "3,4|5,6"  # contiguous, an equal share each
    assert cpu_thread_binding(1, cpus=[0, 1], nodes=1) is None  # vLLM's own binding works
    assert cpu_thread_binding(2, cpus=list(range(8)), nodes=2) is None
    with pytest.raises(ServerError, match="4 vLLM CPU workers need at least 4 CPUs"):
        cpu_thread_binding(4, cpus=[0, 1], nodes=1)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("serving.launcher.numa_nodes", lambda: 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert VLLMServer("m", "--tensor-parallel-size", "2").env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in VLLMServer("m").env
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")
    assert VLLMServer("m", "-tp", "2").env["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"  # the user's choice stands


def test_compression_description_of_a_compressed_and_a_stock_checkpoint(random_compressed, random_source):
    config = json.loads((random_compressed / "config.json").read_text())
    doc = describe(config, str(random_compressed), 4)
    assert doc["compressed"] and doc["method"] == "submoe" and doc["num_router_experts"] == 8
    assert doc["expert_maps"] == [l["expert_map"] for l in config["submoe"]["layers"]]
    assert doc["experts_per_layer"] == [4, 4] and doc["source"]["num_experts"] == 8
    assert doc["report"]["sizes"]["weight_bytes"] == doc["weight_bytes"]
    json.dumps(doc)  # served as JSON
    stock = describe(json.loads((random_source / "config.json").read_text()), str(random_source), 4)
    assert not stock["compressed"] and stock["compression_ratio"] == 1.0 and stock["experts_per_layer"] == [8, 8]
    assert describe({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "x") == \
        {"compressed": False, "moe": False, "architecture": "LlamaForCausalLM"}


@pytest.mark.parametrize("change, message", [
    ({"labels": ["a"]}, "1 labels for 2 deployments"),
    ({"max_tokens": 0}, "--max-tokens must be > 0, got 0"),
    ({"rate": -2.0}, "--rate must be > 0, got -2.0"),
    ({"quality_prompts": 0}, "--quality-prompts must be > 0, got 0"),
    ({"soak_requests": -1}, "--soak-requests must be >= 0, got -1"),
    ({"rounds": 0}, "--rounds must be >= 1, got 0"),
    ({"rounds": 3, "rate": 2.0}, "--rounds interleaves the closed-loop levels only"),
    ({"target_serve_args": [["--dtype", "float32"]]}, "1 per-deployment serve argument lists for 2 deployments"),
])
def test_loadtest_refuses_bad_options_before_starting_anything(tmp_path, change, message):
    from serving.loadtest.cli import LoadTestError, LoadTestOptions, run
    opts = LoadTestOptions(targets=[str(tmp_path / "a"), str(tmp_path / "b")], labels=["a", "b"], data=EVAL,
                           out=tmp_path / "out")
    for k, v in change.items():
        setattr(opts, k, v)
    with pytest.raises(LoadTestError, match=re.escape(message)):
        run(opts)
    assert not (tmp_path / "out").exists()


def test_loadtest_keeps_earlier_results_unless_forced(tmp_path, capsys):
    from submoe.cli import main
    out = tmp_path / "lt"
    out.mkdir()
    (out / "loadtest.json").write_text("{}")
    code = main(["loadtest", "http://127.0.0.1:9", "--data", *EVAL, "--out", str(out), "--no-progress"])
    assert code == 2 and (out / "loadtest.json").read_text() == "{}"
    assert capsys.readouterr().err.startswith(f"submoe loadtest: error: {out} already holds load-test results")


def test_loadtest_needs_data_files(capsys):
    """No default data: an installed package has no repository beside it to take data/eval from."""
    from submoe.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "http://127.0.0.1:9"])
    assert exit_.value.code == 2
    assert "submoe loadtest: error: the following arguments are required: --data" in capsys.readouterr().err


def test_loadtest_checks_every_deployment_before_measuring_the_first(tmp_path):
    from serving.loadtest.cli import LoadTestError, LoadTestOptions, run
    opts = LoadTestOptions(targets=[str(SHIPPED), str(tmp_path / "missing")], labels=["a", "b"], data=EVAL,
                           out=tmp_path / "out")
    with pytest.raises(LoadTestError, match="is neither a model directory nor an http"):
        run(opts)


def test_interleaved_rounds_rotate_the_order_share_prompts_and_ratio_within_each_round():
    from serving.loadtest.interleave import rotation, round_ratios, run_rounds
    assert [rotation(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    calls, fresh = [], iter(range(1000))

    def phase(i, prompts, c):  # deployment 1 is twice as fast as 0, and the machine slows down with time
        calls.append((i, tuple(prompts), c))
        slow = 1 + 0.5 * len(calls)
        tok_s = (2.0 if i == 1 else 1.0) * 100 / slow
        return {"errors": 0, "output_tokens_per_s": tok_s, "itl_s": {"p50": 1 / tok_s}, "ttft_s": {"p50": 0.1 * slow},
                "e2e_s": {"p50": 10 / tok_s}}
    rounds = run_rounds(2, 3, [1, 4], lambda n: [next(fresh) for _ in range(n)], lambda c: 2 * c, phase)
    assert [i for i, _, _ in calls] == [0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1]
    by_level = [calls[k:k + 2] for k in range(0, len(calls), 2)]
    assert all(a[1] == b[1] and a[2] == b[2] and len(a[1]) == 2 * a[2] for a, b in by_level)  # same prompts, same level
    assert len({a[1] for a, _ in by_level}) == len(by_level)  # fresh prompts every round and level
    assert [e["position"] for e in rounds[1]] == [1, 1, 0, 0, 1, 1]
    (c1, c4) = round_ratios(rounds[1], rounds[0])
    tok = c1["output_tokens_per_s"]
    # The k-th call runs on a machine 1 + 0.5 k slower: whichever goes second in a round loses a
    # little, and the rotation makes that each deployment's turn (calls 1-2, 5-6 and 9-10 at level 1).
    assert tok["rounds"] == 3 and tok["above_1"] == 3 and tok["min"] < 2 < tok["max"]
    assert tok["per_round"] == pytest.approx([2 * 1.5 / 2.0, 2 * 4.0 / 3.5, 2 * 5.5 / 6.0])
    assert tok["median"] == pytest.approx(2 * 5.5 / 6.0)
    assert c1["itl_p50_s"]["per_round"] == pytest.approx(tok["per_round"])  # decode speed: the old ITL / the new
    assert c1["ttft_p50_s"]["per_round"] == pytest.approx([1.5 / 2.0, 4.0 / 3.5, 5.5 / 6.0])
    assert c4["concurrency"] == 4 and c4["output_tokens_per_s"]["rounds"] == 3
