"""Every method's checkpoint, served by vLLM, equals the reference forward.

One engine for all methods: a random 16-layer Mixtral is calibrated once and compressed from those
statistics once per method (and variant), and layer l of the served "mosaic" checkpoint is taken
from the l-th method's output, with that method's remap table and its own expert count (pruning
layers drop router experts; MoNE's and `--correct`'s layers carry correction vectors: format 4).
A second engine, in the same subprocess, serves REAP's
`--export vanilla` checkpoint as a stock Mixtral (compared with stock transformers); the same
pruning with dropped router experts computes the same function as that stock checkpoint (torch).
"""
import json

import pytest
import torch
from conftest import CALIB, SHIPPED
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from vllm_helpers import assert_matches_reference, reference_greedy, vllm_results

from offline.calibrate import calibrate
from offline.calibration.settings import CalibrateOptions
from offline.compress import compress
from offline.evaluate import load_reference
from offline.options import CompressOptions
from offline.source.checkpoint import LazyCheckpoint
from offline.synthetic import random_mixtral
from offline.writing.shards import copy_tokenizer
from submoe_format.checkpoint import BLOCK_KEY, dropped_experts, make_block, merged_count, parse_block

# (method, options, experts in its layer)
CONFIGS = [("submoe", {}, 4), ("submoe", {"rank_ratio": 0.5}, 5), ("submoe", {"intra_rank_ratio": 0.5}, 3),
           ("submoe", {"adaptive": True}, 4), ("output-lsq", {}, 4), ("mergemoe", {}, 6), ("hc-smoe", {}, 3),
           ("m-smoe", {"align_neurons": True}, 4), ("reap", {}, 5), ("freq-prune", {}, 2), ("average", {}, 4),
           ("random", {}, 7), ("reap", {"substitute_pruned": True}, 3), ("mone", {}, 3), ("man", {}, 4),
           ("mergemoe", {"correct": True}, 3)]


def _compress(src, stats, out, method, options, n, export="remap"):
    options = dict(options)
    return compress(CompressOptions(model=str(src), out=out, method=method, num_experts=n, stats=str(stats),
                                    correct=options.pop("correct", False), method_options=options, export=export,
                                    progress=False))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return random_mixtral(tmp_path_factory.mktemp("methods") / "src", SHIPPED, layers=len(CONFIGS))


@pytest.fixture(scope="module")
def stats(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("methods-stats") / "stats"
    calibrate(CalibrateOptions(model=str(source), out=out, calib=CALIB[:2], samples=40, seq_len=64, progress=False))
    return out


@pytest.fixture(scope="module")
def vanilla(source, stats, tmp_path_factory):
    """REAP 8 -> 4 written as a stock Mixtral (N'-row router)."""
    out = tmp_path_factory.mktemp("reap-vanilla") / "reap-vanilla"
    _compress(source, stats, out, "reap", {}, 4, export="vanilla")
    return out


@pytest.fixture(scope="module")
def mosaic(source, stats, tmp_path_factory):
    root = tmp_path_factory.mktemp("mosaic")
    src = LazyCheckpoint(source)
    tensors = {n: src.get(n) for n in src.names() if not n.startswith("model.layers.")}
    maps, corrected, constants = [], [], []
    for l, (method, options, n) in enumerate(CONFIGS):
        out = root / f"layer{l}-{method}"
        _compress(source, stats, out, method, options, n)
        ckpt = LazyCheckpoint(out)
        tensors.update({name: ckpt.get(name) for name in ckpt.names()
                        if name.startswith((f"model.layers.{l}.", f"submoe.layers.{l}."))})
        block = parse_block(ckpt.config)
        maps.append(block.expert_maps[l])
        corrected.append(block.is_corrected(l))
        constants.append(block.constants(l))
    dst = root / "mosaic"
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((root / "layer0-submoe" / "config.json").read_text())
    config["num_local_experts"] = max(merged_count(m) for m in maps)
    config[BLOCK_KEY] = make_block(method="mosaic", num_router_experts=8, expert_maps=maps,
                                   source=config[BLOCK_KEY]["source"], weight_bytes=(dst / "model.safetensors").stat().st_size,
                                   corrected=corrected, constant_experts=constants)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(source, dst)
    assert [merged_count(m) for m in maps] == [n for _, _, n in CONFIGS]
    assert [bool(dropped_experts(m, c)) for m, c in zip(maps, constants)] == \
        [m in ("reap", "freq-prune", "man") and not o for m, o, _ in CONFIGS]
    assert [len(c) for c in constants] == [5 if m == "mone" else 0 for m, _, _ in CONFIGS]  # MoNE keeps 3 of 8
    assert corrected == [m == "mone" or "correct" in o for m, o, _ in CONFIGS]
    assert config[BLOCK_KEY]["format_version"] == 4
    return dst


@pytest.fixture(scope="module")
def served(mosaic, vanilla, prompts, tmp_path_factory):
    return vllm_results([mosaic, vanilla], prompts, tmp_path_factory.mktemp("served"))


@pytest.mark.vllm
def test_every_methods_checkpoint_served_by_vllm_equals_the_reference(mosaic, served, prompts):
    ref = load_reference(str(mosaic))
    for p, g in zip(prompts, served[str(mosaic)]):
        assert_matches_reference(g, reference_greedy(ref, p, len(g["token_ids"])))


@pytest.mark.vllm
def test_vanilla_export_served_by_stock_vllm_equals_stock_transformers(vanilla, served, prompts):
    assert json.loads((vanilla / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    stock = AutoModelForCausalLM.from_pretrained(str(vanilla), dtype=torch.float32).eval()
    for p, v in zip(prompts, served[str(vanilla)]):
        assert_matches_reference(v, reference_greedy(stock, p, len(v["token_ids"])))


def test_pruning_with_dropped_router_experts_is_the_function_of_its_vanilla_export(source, stats, vanilla, prompts,
                                                                                    tmp_path):
    """Dropping router experts' logits (what the plugin serves, as the mosaic's pruning layers show) and a
    stock N'-row router compute the same model."""
    dropped = tmp_path / "reap-dropped"
    _compress(source, stats, dropped, "reap", {}, 4)
    assert all(len(dropped_experts(m)) == 4 for m in parse_block(json.loads((dropped / "config.json").read_text()))
               .expert_maps)
    stock = AutoModelForCausalLM.from_pretrained(str(vanilla), dtype=torch.float32).eval()
    served_by_plugin = load_reference(str(dropped))
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            torch.testing.assert_close(served_by_plugin(input_ids=ids).logits, stock(input_ids=ids).logits,
                                       atol=1e-4, rtol=1e-4)
