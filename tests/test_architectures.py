"""Every supported MoE family: the compressor's forward and routing are the source's, shared
experts and dense layers are kept, and vLLM serving the result equals the reference forward, in
one process and across two (tensor and pipeline parallel).

Fixtures are tiny random models built by transformers from each family's own config class
(each family's `tiny` entry in submoe_format.families: shared experts with a sigmoid gate, dense layers, renormalised or raw
top-k, grouped top-k with a routed scaling factor, MLA attention).
"""
import json
import re
import shutil

import pytest
import torch
from conftest import CALIB, EVAL, SHIPPED, write_config
from reference import calibrate_layer
from vllm_helpers import assert_matches_reference, assert_same_serving, identity_copy, reference_greedy, vllm_results

from offline.cli import main as cli
from offline.compress import compress
from offline.evaluate import load_reference
from offline.moe_math import Routing
from offline.options import CompressError, CompressOptions
from offline.source.architecture import SourceArchitecture, hf_config, routing_of
from offline.source.checkpoint import LazyCheckpoint
from offline.synthetic import TINY, random_moe
from offline.writing.shards import copy_tokenizer
from submoe_format.checkpoint import BLOCK_KEY, CheckpointFormatError, layout_for, parse_block
from submoe_format.families import BY_MODEL_TYPE

FAMILIES = sorted(TINY)
NEW_FAMILIES = [f for f in FAMILIES if f != "mixtral"]  # Mixtral is served end to end in test_vllm_serving


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: random_moe(f, root / f, SHIPPED) for f in FAMILIES}


@pytest.fixture(scope="module")
def compressed(sources, tmp_path_factory):
    """Each family 8 -> 5/3 experts (heterogeneous over its MoE layers) with Sub-MoE."""
    root = tmp_path_factory.mktemp("families-compressed")
    out = {}
    for f, src in sources.items():
        moe_layers = sum(SourceArchitecture.of(json.loads((src / "config.json").read_text())).moe_layers())
        counts = [5, 3, 4][:moe_layers]
        compress(CompressOptions(model=str(src), out=root / f, method="submoe", num_experts=counts, calib=CALIB[:2],
                                 samples=8, seq_len=64, progress=False))
        out[f] = root / f
    return out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_streamed_layers_and_routing_are_the_source_models(family, sources):
    """Layer by layer, the compressor computes transformers' full forward; its routing (offline.moe_math)
    picks the experts and weights transformers' own router module does, in every MoE layer."""
    ckpt = LazyCheckpoint(sources[family])
    arch = SourceArchitecture.of(ckpt.config)
    ids = torch.randint(0, arch.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    x = ckpt.get("model.embed_tokens.weight")[ids]
    rotary = arch.rotary(ids.shape[1])
    for l, is_moe in enumerate(arch.moe_layers()):
        tensors = {n: ckpt.get(n) for n in arch.non_expert_names(ckpt.names(), l)}
        experts = arch.read_experts(ckpt, l, arch.num_experts) if is_moe else None
        router = tensors[arch.layout.router_tensor(l)] if is_moe else None
        layer = arch.build_layer(l, tensors, experts)
        routing = arch.layer_routing(l, tensors) if is_moe else arch.routing
        stats, x = calibrate_layer(layer, x, rotary, router, experts, routing, torch.arange(ids.numel()))
        if is_moe:
            ours_w, ours_ids = routing(stats.tokens @ router.T)
            _, hf_w, hf_ids = layer.mlp.gate(stats.tokens)
            dense = lambda w, i: torch.zeros(len(w), arch.num_experts).scatter_(1, i, w.float())  # noqa: E731
            torch.testing.assert_close(dense(ours_w, ours_ids), dense(hf_w, hf_ids), atol=1e-6, rtol=1e-5)
            assert stats.frequency.sum().item() == pytest.approx(1.0)
        else:
            assert stats is None and not any(".experts." in n for n in tensors)
    x = torch.nn.functional.rms_norm(x, (x.shape[-1],), ckpt.get("model.norm.weight"), arch.config.rms_norm_eps)
    logits = x @ ckpt.get("lm_head.weight").T
    torch.testing.assert_close(logits, load_reference(str(sources[family]))(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_large_shape_sources_are_named_and_shaped_as_transformers_writes_them(tmp_path):
    """The scaling benchmark's generator (one tensor at a time, any shape) writes what save_pretrained
    writes for the same config: the same tensor names and shapes, in every family."""
    from offline.synthetic import sharded_random_moe
    for family in FAMILIES:
        ours = LazyCheckpoint(sharded_random_moe(family, tmp_path / f"{family}-sharded", SHIPPED, layers=3, hidden_size=96))
        theirs = LazyCheckpoint(random_moe(family, tmp_path / family, SHIPPED, hidden=96))
        assert sorted(ours.names()) == sorted(theirs.names()), family
        assert {n: ours.get(n).shape for n in ours.names()} == {n: theirs.get(n).shape for n in theirs.names()}, family
        assert ours.get(ours.names()[-1]).dtype == torch.bfloat16


def other_naming(src, out, fused: bool):
    """The checkpoint `src` as other tools write it: transformers 5's fused experts
    (`save_original_format=False`: experts.gate_up_proj [E, 2I, H], Mixtral's block_sparse_moe saved as
    mlp), or per-expert tensors under the other projection names (what llm-compressor 0.14 writes for
    a Mixtral it pruned: block_sparse_moe.experts.{e}.gate_proj/up_proj/down_proj; w1/w3/w2 for the others)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    if fused:
        AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, save_original_format=False)
        copy_tokenizer(src, out)
        return out
    other = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    other.update({v: k for k, v in other.items()})
    rename = lambda n: re.sub(r"\.experts\.(\d+)\.(\w+)\.weight$",  # noqa: E731
                              lambda m: f".experts.{m.group(1)}.{other[m.group(2)]}.weight", n)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    for f in src.glob("*.safetensors"):
        save_file({rename(n): t for n, t in load_file(f).items()}, out / f.name, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "renamed"])
def test_sources_in_other_namings_read_as_the_family_own(sources, tmp_path, fused):
    """Every family's checkpoint, stored with fused experts or the other per-expert names, reads as the
    same tensors under the family's names (views: nothing copied)."""
    for family in FAMILIES:
        src = LazyCheckpoint(sources[family])
        ckpt = LazyCheckpoint(other_naming(sources[family], tmp_path / family, fused))
        stored = {s.name for _, s in ckpt._where.values()}
        assert stored.isdisjoint(n for n in src.names() if ".experts." in n), family  # stored otherwise
        assert sorted(ckpt.names()) == sorted(src.names()), family
        for name in src.names():
            assert torch.equal(ckpt.get(name), src.get(name)), (family, name)


def test_a_source_in_another_naming_compresses_to_the_same_checkpoint(sources, tmp_path):
    """End to end: llm-compressor's and transformers 5's namings of one Mixtral compress to the very
    checkpoint its own naming does (Mixtral: the one family whose MoE module is renamed too)."""
    from safetensors.torch import load_file
    outs = []
    for name, fused in (("own", None), ("fused", True), ("renamed", False)):
        src = sources["mixtral"] if fused is None else other_naming(sources["mixtral"], tmp_path / f"src-{name}", fused)
        compress(CompressOptions(model=str(src), out=tmp_path / name, method="submoe", num_experts=4,
                                 calib=CALIB[:1], samples=4, seq_len=32, progress=False))
        config = json.loads((tmp_path / name / "config.json").read_text())
        tensors = {n: t for f in sorted((tmp_path / name).glob("*.safetensors")) for n, t in load_file(f).items()}
        outs.append((config[BLOCK_KEY]["layers"], tensors))
    for layers, tensors in outs[1:]:
        assert layers == outs[0][0]
        assert tensors.keys() == outs[0][1].keys()
        assert all(torch.equal(t, outs[0][1][n]) for n, t in tensors.items())


def test_a_profile_needs_a_source_in_the_familys_own_naming(sources, tmp_path):
    """A profile names the source's tensors as they are stored: fused or renamed experts are refused
    before anything is read, pointing to the remap export."""
    src = other_naming(sources["mixtral"], tmp_path / "fused", fused=True)
    with pytest.raises(CompressError, match="--export profile reads the unchanged tensors .* use --export remap"):
        compress(CompressOptions(model=str(src), out=tmp_path / "out", method="reap", num_experts=4, export="profile",
                                 calib=CALIB[:1], samples=4, seq_len=32, progress=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_profile_reads_as_its_remap_export_in_every_family(family, sources, tmp_path):
    """Per-layer counts, shared experts, dense layers, grouped routing: a profile (kept experts read from
    the source into their slots, merged ones stored) holds the very tensors its remap export does."""
    counts = [5, 3, 4][:sum(SourceArchitecture.of(json.loads((sources[family] / "config.json").read_text()))
                            .moe_layers())]
    outs = {}
    for export in ("remap", "profile"):
        outs[export] = tmp_path / export
        compress(CompressOptions(model=str(sources[family]), out=outs[export], method="freq-prune", num_experts=counts,
                                 method_options={"substitute_pruned": True}, export=export, calib=CALIB[:1], samples=4,
                                 seq_len=32, progress=False))
    remap, profile = LazyCheckpoint(outs["remap"]), LazyCheckpoint(outs["profile"])
    block = parse_block(profile.config)
    assert all(j is not None for kept in block.source_experts if kept for j in kept)  # a pruning stores no expert
    assert sorted(profile.names()) == sorted(remap.names())
    for name in remap.names():
        assert torch.equal(profile.get(name), remap.get(name)), name
    assert profile.nbytes() == remap.nbytes()


def test_a_pruned_mixtral_in_llm_compressor_naming_is_evaluated(sources, tmp_path):
    """An expert-pruned stock Mixtral as llm-compressor's REAP writes it (4 router rows, experts as
    gate_proj/up_proj/down_proj): `submoe eval` used to refuse it ("missing tensor ...w1"); it now
    scores exactly what the same weights score in the canonical naming."""
    from offline.evaluate import evaluate
    pruned = tmp_path / "pruned"
    compress(CompressOptions(model=str(sources["mixtral"]), out=pruned, method="reap", num_experts=4,
                             export="vanilla", calib=CALIB[:1], samples=4, seq_len=32, progress=False))
    theirs = other_naming(pruned, tmp_path / "theirs", fused=False)
    scores = [evaluate(str(m), EVAL[:1], reference=str(sources["mixtral"]), seq_len=64, max_windows=2,
                       progress=False)["domains"] for m in (pruned, theirs)]
    assert scores[0] == scores[1]
    assert next(iter(scores[0].values()))["kl"] > 1e-4  # pruning changed the model: the comparison is not vacuous


def test_mixed_or_misshapen_namings_are_refused():
    from offline.source.naming import NamingError, canonical_sources
    mixtral = BY_MODEL_TYPE["mixtral"]
    both = {"model.layers.0.block_sparse_moe.experts.0.w1.weight": (4, 8),
            "model.layers.0.mlp.experts.0.gate_proj.weight": (4, 8)}
    with pytest.raises(NamingError, match="stored twice.*w1.weight.*gate_proj.weight"):
        canonical_sources(mixtral, both)
    with pytest.raises(NamingError, match=r"gate_up_proj has shape \[8, 7, 16\], not \[experts, 2 x intermediate"):
        canonical_sources(mixtral, {"model.layers.0.mlp.experts.gate_up_proj": (8, 7, 16)})
    with pytest.raises(NamingError, match=r"gate_up_proj has shape \[8, 16, 48\].*hidden size 16"):  # transposed
        canonical_sources(mixtral, {"model.layers.0.mlp.experts.gate_up_proj": (8, 16, 48)}, hidden=16)
    dense = {"model.layers.0.mlp.gate_proj.weight": (4, 8), "model.layers.1.mlp.shared_experts.up_proj.weight": (4, 8)}
    assert {n: s.name for n, s in canonical_sources(BY_MODEL_TYPE["deepseek_v3"], dense).items()} == \
        {n: n for n in dense}  # a dense MLP and shared experts are not routed experts


def test_each_family_routes_as_its_config_says(sources):
    routing = {f: SourceArchitecture.of(json.loads((src / "config.json").read_text())).routing
               for f, src in sources.items()}
    assert routing["mixtral"] == Routing(2, renormalize=True)
    assert routing["qwen3_moe"] == Routing(2, renormalize=True)
    assert routing["qwen2_moe"] == Routing(2, renormalize=False) == routing["olmoe"]
    assert routing["deepseek_v2"] == Routing(2, renormalize=False, num_groups=4, topk_groups=2, scaling=2.0)
    assert routing["deepseek_v3"] == Routing(2, renormalize=True, num_groups=4, topk_groups=2, scaling=2.5,
                                             scoring="sigmoid")


# Each family's tiny fixture, and variants that flip what its routing and MoE-layer rules read.
RULE_CASES = [(f, {}) for f in FAMILIES] + [
    ("mixtral", dict(num_hidden_layers=4)),
    ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=5)),
    ("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=3, mlp_only_layers=[5], num_hidden_layers=6)),
    ("olmoe", dict(norm_topk_prob=True)),
    # (transformers' DeepSeek-V2 ignores norm_topk_prob; the routing renormalises when it is set, as vLLM does)
    ("deepseek_v2", dict(topk_method="greedy", routed_scaling_factor=1.5)),
    ("deepseek_v2", dict(first_k_dense_replace=2, n_group=2, topk_group=1, num_hidden_layers=4)),
    ("deepseek_v3", dict(norm_topk_prob=False, routed_scaling_factor=1.0, n_group=2, topk_group=1,
                         first_k_dense_replace=2, num_hidden_layers=4)),
]


@pytest.mark.parametrize("family, changes", RULE_CASES,
                         ids=[f"{f}-{'-'.join(c) or 'tiny'}" for f, c in RULE_CASES])
@torch.no_grad()
def test_family_rules_are_what_transformers_builds_and_routes(family, changes):
    """A family entry's MoE-layer rule names the layers transformers builds with routed experts, and its
    routing rule (offline.moe_math.Routing) picks the experts and weights transformers' router does."""
    entry = BY_MODEL_TYPE[family]
    config = {"model_type": family, "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 2, "max_position_embeddings": 64, **entry.tiny, **changes}
    cfg = hf_config(config)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    built = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert entry.moe_layers(config) == built == entry.moe_layers(cfg.to_dict())
    assert any(built)
    routing = routing_of(entry, cfg)
    gate = model.model.layers[built.index(True)].mlp.gate.to_empty(device="cpu")
    gate.weight.copy_(torch.randn(gate.weight.shape) * 3)
    if entry.routing.bias_name:  # the layer's score-correction bias (DeepSeek-V3): picks, never weighs
        bias = getattr(gate, entry.routing.bias_name)
        bias.copy_(torch.randn(bias.shape) * 0.5)
        routing = routing.for_layer(bias)
    tokens = torch.randn(256, cfg.hidden_size)
    ours_w, ours_ids = routing(tokens @ gate.weight.T)
    _, hf_w, hf_ids = gate(tokens)
    dense = lambda w, i: torch.zeros(len(w), entry.num_experts(config)).scatter_(1, i, w.float())  # noqa: E731
    torch.testing.assert_close(dense(ours_w, ours_ids), dense(hf_w, hf_ids), atol=1e-6, rtol=1e-5)


def test_no_model_type_comparison_outside_the_family_table():
    """A family's knowledge lives in its submoe_format.families entry: no code elsewhere branches on a
    model_type."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = root / "vllm_submoe" / "families.py"
    families = "|".join(BY_MODEL_TYPE)
    # `model_type ==` / `!=` anything, `model_type in (...literals...)`, `"<family>" ==` / `in`; a lookup in
    # the table (`model_type not in BY_MODEL_TYPE`) is not a comparison
    pattern = re.compile(r"model_type\W*\s*(==|!=|(not\s+)?in\s*[(\[{]\s*[\"'])|(==|!=)\s*\S*model_type\b|"
                         rf"[\"']({families})[\"']\s*(==|!=|(not\s+)?in\b)")
    offenders = [f"{path.relative_to(root)}:{n}: {line.strip()}"
                 for package in ("offline", "vllm_submoe", "serving") for path in sorted((root / package).rglob("*.py"))
                 if path != table for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, "model_type comparisons outside submoe_format/families.py:\n" + "\n".join(offenders)
    assert all(pattern.search(line) for line in ('if layout.model_type == "mixtral":', 'if "olmoe" != f.model_type:',
                                                 'if self.model_type in ("qwen2_moe", "qwen3_moe"):',
                                                 'if config["model_type"] not in ["a"]:'))
    assert not pattern.search("if model_type not in BY_MODEL_TYPE:")


def test_grouped_topk_only_picks_experts_of_the_best_groups():
    logits = torch.tensor([[9.0, 0, 0, 0, 8.5, 8.4, 0, 0]])  # groups of 2: {0,1} {2,3} {4,5} {6,7}
    _, ids = Routing(2, renormalize=False, num_groups=4, topk_groups=1)(logits)
    assert sorted(ids[0].tolist()) == [0, 1]  # only group {0,1}: expert 4 (second best) is outside it
    _, ids = Routing(2, renormalize=False, num_groups=4, topk_groups=2)(logits)
    assert sorted(ids[0].tolist()) == [0, 4]


V3_BIAS = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 0.5  # DeepSeek-V3's score correction


@pytest.mark.parametrize("vllm_args, routing", [
    (dict(renormalize=True), Routing(2)),
    (dict(renormalize=False), Routing(2, renormalize=False)),
    (dict(renormalize=False, use_grouped_topk=True, num_expert_group=4, topk_group=2, routed_scaling_factor=2.0),
     Routing(2, renormalize=False, num_groups=4, topk_groups=2, scaling=2.0)),

    (dict(renormalize=True, use_grouped_topk=True, num_expert_group=4, topk_group=2, routed_scaling_factor=2.5,
          scoring_func="sigmoid", e_score_correction_bias=V3_BIAS),
     Routing(2, renormalize=True, num_groups=4, topk_groups=2, scaling=2.5, scoring="sigmoid", bias=V3_BIAS)),
])
def test_plugin_router_is_vllms_source_routing_then_the_remap(vllm_args, routing):
    """The served routing (vLLM's own router for the source's settings, wrapped by the remap) equals
    the source's routing followed by expert_map, weight for weight per merged expert."""
    from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

    from vllm_submoe.models.remapped_moe import RemappedRouter
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 3
    expert_map = [0, 0, 1, 2, 3, 1, 2, 3]
    router = RemappedRouter(create_fused_moe_router(top_k=2, global_num_experts=8, **vllm_args), expert_map)
    w, ids = router.select_experts(torch.zeros(64, 16), logits)
    ref_w, ref_ids = routing(logits)
    per_merged = lambda w, i: torch.zeros(64, 4).scatter_add_(1, i.long(), w.float())  # noqa: E731
    torch.testing.assert_close(per_merged(w, ids), per_merged(ref_w, torch.tensor(expert_map)[ref_ids]),
                               atol=1e-6, rtol=1e-5)
    assert int(ids.max()) < 4


@pytest.mark.parametrize("ep_size", [2, 4])
@pytest.mark.parametrize("strategy", ["linear", "round_robin"])
@pytest.mark.parametrize("expert_map", [[0, 0, 1, 2, 2, 1, 0, 2], [0, 1, 2, 3, 4, 4, 3, 0]])
def test_remapped_ids_reach_exactly_one_rank_under_expert_parallelism(ep_size, strategy, expert_map):
    """The remap yields global merged-expert ids; vLLM's expert-parallel map (global -> local, -1
    elsewhere) sends each chosen (token, slot) to exactly one rank, which holds that merged expert,
    also for merged counts that do not divide by the EP size (3 and 5 experts here)."""
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
    from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

    from vllm_submoe.models.remapped_moe import RemappedRouter
    n_merged = max(expert_map) + 1
    router = RemappedRouter(create_fused_moe_router(top_k=2, global_num_experts=8, renormalize=True), expert_map)
    _, ids = router.select_experts(torch.zeros(256, 16), torch.randn(256, 8, generator=torch.Generator().manual_seed(0)))
    maps = [determine_expert_map(ep_size, rank, n_merged, strategy)[1] for rank in range(ep_size)]
    owners = torch.stack([m[ids.long()] >= 0 for m in maps])  # [rank, token, slot]
    assert torch.equal(owners.sum(0), torch.ones_like(ids))
    held = [{int(g) for g in torch.nonzero(m >= 0).flatten()} for m in maps]
    assert set().union(*held) == set(range(n_merged)) and sum(map(len, held)) == n_merged


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_shared_experts_and_dense_layers_are_kept_bit_for_bit(family, sources, compressed):
    src, out = LazyCheckpoint(sources[family]), LazyCheckpoint(compressed[family])
    layout = layout_for(src.config)
    kept = [n for n in src.names() if not layout.is_expert_tensor(n)]
    assert any("shared_expert" in n for n in kept) == (family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    assert any("e_score_correction_bias" in n for n in kept) == (family == "deepseek_v3")
    for name in kept:
        assert torch.equal(src.get(name), out.get(name)), name
    block = parse_block(out.config)
    assert out.config["architectures"] == [layout.plugin_architecture]
    assert [m is None for m in block.expert_maps] == [not moe for moe in layout.moe_layers(src.config)]


def test_unsupported_architecture_fails_naming_the_supported_ones(sources, tmp_path):
    src = tmp_path / "dbrx"
    shutil.copytree(sources["mixtral"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "dbrx", "architectures": ["DbrxForCausalLM"]}))
    with pytest.raises(CheckpointFormatError) as e:
        compress(CompressOptions(model=str(src), out=tmp_path / "out", method="average", num_experts=4,
                                 calib=CALIB[:1], samples=4, seq_len=32, progress=False))
    assert "model_type='dbrx'" in str(e.value)
    for layout in BY_MODEL_TYPE.values():
        assert layout.source_architecture in str(e.value)
    assert cli(["compress", "--model", str(src), "--out", str(tmp_path / "o"), "--method", "average",
                "--num-experts", "4", "--calib", CALIB[0]]) == 2
    assert not (tmp_path / "o").exists()


def test_a_block_that_disagrees_with_the_dense_layers_is_refused(compressed):
    config = json.loads((compressed["deepseek_v2"] / "config.json").read_text())
    config[BLOCK_KEY]["layers"][0] = {"num_experts": 1, "expert_map": [0] * 8}
    with pytest.raises(CheckpointFormatError, match=r"layers\[0\] has an expert map but the architecture has a dense"):
        parse_block(config)
    config[BLOCK_KEY]["layers"][0], config[BLOCK_KEY]["layers"][1] = None, None
    with pytest.raises(CheckpointFormatError, match=r"layers\[1\] is null but the architecture routes experts"):
        parse_block(config)


@pytest.mark.parametrize("family, changes, message", [
    ("deepseek_v2", {}, "cannot keep grouped top-k routing"),
    ("deepseek_v3", {"n_group": 1, "topk_group": 1}, "cannot keep the per-layer score-correction bias"),
])
def test_vanilla_export_refuses_grouped_routing_and_a_score_correction_bias(sources, tmp_path, family, changes, message):
    src = tmp_path / "src"
    shutil.copytree(sources[family], src)
    write_config(src, **changes)
    with pytest.raises(CompressError, match=f"--export vanilla {message}"):
        compress(CompressOptions(model=str(src), out=tmp_path / "v", method="average", num_experts=4, export="vanilla",
                                 calib=CALIB[:1], samples=4, seq_len=32, progress=False))
    assert not (tmp_path / "v").exists()


# vLLM 0.32's CPU backend computes DeepSeek-V2 differently from transformers in eager mode (up to
# 0.06 logprob, stock vLLM on the source model) and exactly once compiled: DeepSeek runs compiled.
COMPILED = {"deepseek_v2", "deepseek_v3"}
# stock vLLM on the source against the plugin on an identity-map copy: a shared expert with a sigmoid gate,
# top-k not renormalised, a dense layer (DeepSeek is served compiled, which costs ~30 s more an engine)
IDENTITY = "qwen2_moe"
DISTRIBUTED = "qwen2_moe"  # per-layer counts, a shared expert, a dense layer, more layers than stages
PARALLEL = {"tensor parallel 2": "tensor_parallel_size=2",
            # compiled: vLLM's CPU runner fails pipeline parallelism in eager mode, for stock models too
            "pipeline parallel 2": "pipeline_parallel_size=2,enforce_eager=0"}
PARALLEL_ATOL = 5e-5  # the same kernels, partial sums reduced across ranks (measured: <= 1e-6 here, 3.1e-6 on Mixtral)


@pytest.fixture(scope="module")
def served(sources, compressed, tmp_path_factory, prompts):
    """What vLLM serves, by run: every family's merged checkpoint; stock vLLM on the IDENTITY family's
    source and the plugin on its identity-map copy; the DISTRIBUTED family's merged checkpoint across
    two CPU worker processes. Engines run one after another in two subprocesses (eager, compiled)."""
    root = tmp_path_factory.mktemp("served")
    runs = {f: str(compressed[f]) for f in NEW_FAMILIES}
    runs.update({"stock": str(sources[IDENTITY]), "identity": str(identity_copy(sources[IDENTITY], root / "identity"))})
    runs.update({label: f"{compressed[DISTRIBUTED]}@{args}" for label, args in PARALLEL.items()})
    compiled = {*COMPILED, "pipeline parallel 2"}
    got = {}
    for mode in (False, True):
        specs = [spec for label, spec in runs.items() if (label in compiled) == mode]
        got.update(vllm_results(specs, prompts[:3], root / f"run-{mode}", 6, *([] if mode else ["--enforce-eager"])))
    return {label: got[spec] for label, spec in runs.items()}


@pytest.mark.vllm
def test_vllm_serves_every_family_as_the_reference_computes(sources, compressed, served, prompts):
    """Per family, the plugin on the merged checkpoint computes transformers' reference forward of the
    merged model."""
    for f in NEW_FAMILIES:
        ref, src = load_reference(str(compressed[f])), load_reference(str(sources[f]))
        for p, g in zip(prompts, served[f]):
            assert_matches_reference(g, reference_greedy(ref, p, len(g["token_ids"])))
        # and merging changed the model (the comparison above could not pass by accident)
        ids = torch.tensor([prompts[0]])
        with torch.no_grad():
            assert not torch.allclose(ref(input_ids=ids).logits, src(input_ids=ids).logits, atol=1e-3), f


@pytest.mark.vllm
def test_plugin_with_identity_maps_serves_what_stock_vllm_serves(served):
    assert_same_serving(served["identity"], served["stock"])


@pytest.mark.vllm
def test_tensor_and_pipeline_parallel_serve_what_one_process_serves(served):
    """The merged checkpoint across two CPU worker processes (the thread binding vLLM's CPU build needs on
    a one-NUMA-node machine is set as serving.launcher sets it for `vllm serve`)."""
    for label in PARALLEL:
        assert_same_serving(served[label], served[DISTRIBUTED], atol=PARALLEL_ATOL)
