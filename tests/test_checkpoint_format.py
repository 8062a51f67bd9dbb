"""Format validation (versions 1 to 4): each malformed `submoe` block or tensor gets one error naming it."""
import copy

import pytest

from submoe_format.checkpoint import (
    CheckpointFormatError,
    check_all_present,
    check_tensor_shape,
    correction_tensor,
    dropped_experts,
    expected_expert_tensors,
    layout_for,
    make_block,
    parse_block,
)

BASE = {"model_type": "mixtral", "architectures": ["SubMoEMixtralForCausalLM"], "num_hidden_layers": 2,
        "hidden_size": 64, "intermediate_size": 96, "num_local_experts": 4, "num_experts_per_tok": 2,
        "submoe": make_block("submoe", {"architecture": "MixtralForCausalLM", "num_experts": 8}, 8,
                             [[0, 0, 1, 2, 3, 1, 2, 3], [0, 1, 2, 0, 1, 2, 0, 1]])}


def _with(mutate):
    config = copy.deepcopy(BASE)
    mutate(config)
    return config


def test_valid_block_parses_with_per_layer_counts():
    block = parse_block(BASE)
    assert block.experts_per_layer == (4, 3)
    assert block.num_router_experts == 8


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.pop("submoe"), "block is missing"),
    (lambda c: c["submoe"].update(format_version=99), "format_version is 99; this vllm-submoe reads versions 1, 2, 3, 4"),
    (lambda c: c["submoe"].update(format_version="2"), "format_version is '2'"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(5, 1.0),
     r"layers\[0\]\.expert_map\[5\] = 1.0 is not an integer"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(5, None),
     r"layers\[0\]\.expert_map\[5\] is null \(a dropped router expert\), which format version 1 cannot say"),
    (lambda c: c["submoe"].update(num_router_experts=0), "num_router_experts must be a positive integer"),
    (lambda c: c["submoe"]["layers"].pop(), r"one entry per decoder layer \(num_hidden_layers=2\), got 1"),
    (lambda c: c["submoe"]["layers"][1]["expert_map"].pop(),
     r"layers\[1\]\.expert_map must have one entry per router expert \(8\), got 7"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(5, 4), r"layers\[0\]\.expert_map\[5\] = 4 is outside 0..3"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(5, -1), r"layers\[0\]\.expert_map\[5\] = -1 is outside"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(5, "1"), r"expert_map\[5\] = '1'"),
    (lambda c: c["submoe"]["layers"][1].update(num_experts=4),
     r"layers\[1\]\.expert_map reaches no router expert to merged expert\(s\) \[3\]"),
    (lambda c: c["submoe"]["layers"][0].update(num_experts=9), r"layers\[0\]\.num_experts must be an integer in 1..8"),
    (lambda c: c.update(num_local_experts=8), "`num_local_experts` is 8 but the largest per-layer expert count"),
    (lambda c: c.update(num_experts_per_tok=9), r"`num_experts_per_tok` must be an integer in 1..8"),
    (lambda c: c.update(num_experts_per_tok=0), r"`num_experts_per_tok` must be an integer in 1..8 .*got 0"),
    (lambda c: c["submoe"].update(layers=[]), "one entry per decoder layer"),
    (lambda c: c.update(model_type="llama"), "unsupported architecture model_type='llama'.*supports MixtralForCausalLM "
                                              r"\(mixtral\), Qwen2MoeForCausalLM"),
])
def test_bad_blocks_give_one_clear_error(mutate, message):
    with pytest.raises(CheckpointFormatError, match=message):
        parse_block(_with(mutate))


PRUNED = {**BASE, "submoe": make_block("reap", {"architecture": "MixtralForCausalLM", "num_experts": 8}, 8,
                                       [[0, None, 1, 2, 3, None, None, None], [None, 0, 1, None, 2, None, None, None]])}


def test_dropped_router_experts_need_format_2_and_parse():
    assert PRUNED["submoe"]["format_version"] == 2 and BASE["submoe"]["format_version"] == 1
    block = parse_block(PRUNED)
    assert block.experts_per_layer == (4, 3)
    assert block.expert_maps[1] == (None, 0, 1, None, 2, None, None, None)
    expected = expected_expert_tensors(PRUNED, block)
    assert expected[layout_for(PRUNED).router_tensor(0)] == (8, 64)  # the router keeps all N rows


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["submoe"]["layers"][1].update(expert_map=[None, 0, None, None, None, None, None, None], num_experts=1),
     r"layers\[1\] drops 7 of 8 router experts, leaving 1, fewer than the 2 each token routes to"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(1, -1), r"expert_map\[1\] = -1 is outside 0..3"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(1, "null"), r"expert_map\[1\] = 'null' is not an integer"),
    (lambda c: c["submoe"]["layers"][0]["expert_map"].__setitem__(0, None),
     r"layers\[0\]\.expert_map reaches no router expert to merged expert\(s\) \[0\]"),
])
def test_malformed_drops_give_one_clear_error(mutate, message):
    config = copy.deepcopy(PRUNED)
    mutate(config)
    with pytest.raises(CheckpointFormatError, match=message):
        parse_block(config)


PROFILE = {**BASE, "submoe": make_block(
    "mergemoe", {"architecture": "MixtralForCausalLM", "num_experts": 8}, 8,
    [[0, 0, 1, 2, 3, 1, 2, 3], [0, 1, 2, 0, 1, 2, 0, 1]],
    profile={"path": "/models/src", "files": {"model.safetensors": {"bytes": 10, "header_sha256": "ab"}}},
    source_experts=[[None, None, 3, 4], [None, None, 2]])}


def test_a_profile_is_format_3_and_parses_its_kept_experts():
    assert PROFILE["submoe"]["format_version"] == 3
    block = parse_block(PROFILE)
    assert block.profile["path"] == "/models/src" and block.source_experts == ((None, None, 3, 4), (None, None, 2))
    assert parse_block(BASE).profile is None


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["submoe"].update(format_version=2), r"`submoe`\.profile needs format_version 3, the block says 2"),
    (lambda c: c["submoe"]["profile"].pop("files"), r"`submoe`\.profile must give the source `path` and its `files`"),
    (lambda c: c["submoe"]["profile"]["files"]["model.safetensors"].pop("header_sha256"), "must give the source"),
    (lambda c: c["submoe"]["layers"][0].pop("source_experts"),
     r"layers\[0\]\.source_experts must list one entry per served expert \(4\)"),
    (lambda c: c["submoe"]["layers"][0]["source_experts"].__setitem__(2, 1),  # router expert 1 is served by slot 0
     r"layers\[0\]\.source_experts\[2\] = 1 is not a router expert that served expert 2 serves"),
    (lambda c: c["submoe"]["layers"][1]["source_experts"].__setitem__(0, 8), r"source_experts\[0\] = 8 is not"),
])
def test_malformed_profiles_give_one_clear_error(mutate, message):
    config = copy.deepcopy(PROFILE)
    mutate(config)
    with pytest.raises(CheckpointFormatError, match=message):
        parse_block(config)


CORRECTED = {**BASE, "submoe": make_block(
    "mone", {"architecture": "MixtralForCausalLM", "num_experts": 8}, 8,
    [[0, None, 1, 2, 3, None, None, None], [0, 0, 1, 2, 1, 2, 0, 1]],
    corrected=[True, True], constant_experts=[[1, 5, 6], []])}


def test_corrections_are_format_4_constant_experts_are_not_dropped_and_the_tensor_is_expected():
    assert CORRECTED["submoe"]["format_version"] == 4
    block = parse_block(CORRECTED)
    assert block.constants(0) == (1, 5, 6) and block.constants(1) == () and block.is_corrected(1)
    assert dropped_experts(block.expert_maps[0], block.constants(0)) == [7]
    expected = expected_expert_tensors(CORRECTED, block)
    assert expected[correction_tensor(0)] == expected[correction_tensor(1)] == (8, 64)
    assert parse_block(BASE).corrected == () and not parse_block(BASE).is_corrected(0)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["submoe"].update(format_version=3), r"layers\[0\]\.correction needs format_version 4"),
    (lambda c: c["submoe"]["layers"][0].update(correction="yes"), r"layers\[0\]\.correction must be true or false"),
    (lambda c: c["submoe"]["layers"][0].update(correction=False), r"layers\[0\]\.constant_experts are served by their "
                                                                  r"correction row, but the layer has no correction"),
    (lambda c: c["submoe"]["layers"][0].update(constant_experts=[1, 8]), r"constant_experts must list distinct router "
                                                                         r"experts in 0..7, got \[1, 8\]"),
    (lambda c: c["submoe"]["layers"][0].update(constant_experts=[1, 1]), "must list distinct"),
    (lambda c: c["submoe"]["layers"][0].update(constant_experts=[0, 1]), r"constant_experts \[0\] also serve"),
    (lambda c: c["submoe"]["layers"][0].update(constant_experts=[]),  # all four nulls are then drops, 4 left: fine;
     None),                                                           # with 7 drops too few are left:
    (lambda c: c.update(num_local_experts=3) or c["submoe"]["layers"][0].update(
        expert_map=[0] + [None] * 7, num_experts=1, constant_experts=[]),
     r"layers\[0\] drops 7 of 8 router experts, leaving 1"),
])
def test_malformed_corrections_give_one_clear_error(mutate, message):
    config = copy.deepcopy(CORRECTED)
    mutate(config)
    if message is None:
        parse_block(config)
        return
    with pytest.raises(CheckpointFormatError, match=message):
        parse_block(config)


def test_drops_are_refused_with_grouped_routing():
    config = {**copy.deepcopy(DEEPSEEK), "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}
    parse_block(config)
    config["submoe"] = make_block("reap", {"num_experts": 4}, 4, [None, [0, 1, 2, None], [0, None, 1, None]])
    with pytest.raises(CheckpointFormatError, match="grouped top-k.*--substitute-pruned"):
        parse_block(config)
    config.update(topk_method="greedy")
    assert parse_block(config).experts_per_layer == (0, 3, 2)


def test_expected_tensors_cover_every_merged_expert_and_router():
    expected = expected_expert_tensors(BASE, parse_block(BASE))
    layout = layout_for(BASE)
    assert expected[layout.router_tensor(1)] == (8, 64)
    assert expected[layout.expert_tensor(0, 3, "down")] == (64, 96)
    assert layout.expert_tensor(1, 3, "gate") not in expected  # layer 1 has 3 experts
    assert len(expected) == 2 + 3 * (4 + 3)


def test_tensor_shape_and_presence_checks_name_the_tensor():
    expected = expected_expert_tensors(BASE, parse_block(BASE))
    name = layout_for(BASE).expert_tensor(0, 2, "gate")
    check_tensor_shape(name, (96, 64), expected)
    check_tensor_shape("model.norm.weight", (1,), expected)  # not an expert tensor: not ours to check
    with pytest.raises(CheckpointFormatError, match=rf"{name} has shape \(64, 96\), expected \(96, 64\)"):
        check_tensor_shape(name, (64, 96), expected)
    stray = layout_for(BASE).expert_tensor(1, 3, "gate")  # layer 1 holds experts 0..2 only
    with pytest.raises(CheckpointFormatError, match=f"unexpected expert tensor {stray}"):
        check_tensor_shape(stray, (96, 64), expected)
    with pytest.raises(CheckpointFormatError, match="unexpected expert tensor"):
        check_tensor_shape("model.layers.0.block_sparse_moe.experts.0.gate_proj.weight", (96, 64), expected)
    with pytest.raises(CheckpointFormatError, match="missing tensor"):
        check_all_present(set(expected) - {name}, expected)
    check_all_present(expected, expected)


DEEPSEEK = {"model_type": "deepseek_v2", "architectures": ["SubMoEDeepseekV2ForCausalLM"], "num_hidden_layers": 3,
            "first_k_dense_replace": 1, "hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 3,
            "num_experts_per_tok": 2,
            "submoe": make_block("submoe", {"num_experts": 4}, 4, [None, [0, 1, 2, 2], [0, 0, 1, 1]])}


def test_dense_layers_have_no_map_and_no_expected_tensors():
    block = parse_block(DEEPSEEK)
    assert block.expert_maps[0] is None and block.experts_per_layer == (0, 3, 2)
    expected = expected_expert_tensors(DEEPSEEK, block)
    assert not any(k.startswith("model.layers.0.") for k in expected)
    assert expected["model.layers.1.mlp.gate.weight"] == (4, 64)
    assert expected["model.layers.2.mlp.experts.1.down_proj.weight"] == (64, 32)


def test_the_expert_count_key_follows_the_config():
    """Hub Qwen-MoE configs say num_experts; transformers 5 writes num_local_experts."""
    from submoe_format.families import QWEN3_MOE
    assert QWEN3_MOE.num_experts_key({"num_experts": 8}) == "num_experts"
    assert QWEN3_MOE.num_experts_key({"num_local_experts": 8}) == "num_local_experts"
    assert QWEN3_MOE.num_experts({"num_local_experts": 8}) == 8


def test_a_count_under_two_names_is_written_under_both_and_must_agree():
    """A Qwen3-MoE config may carry num_experts (hub) and num_local_experts (transformers 5), and
    transformers then reads only one: an export that set just one served the source's count (a
    64->32 checkpoint that vLLM refused as 64 experts). Both are written; apart, they are refused."""
    from offline.source.architecture import SourceArchitecture
    from offline.writing.config import output_config
    from submoe_format.families import QWEN3_MOE
    source = {**QWEN3_MOE.tiny, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
              "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 128,
              "num_experts": 8, "num_local_experts": 8}
    maps = [[0, 0, 1, 2, 3, 1, 2, 3], [0, 1, 2, 0, 1, 2, 0, 1]]
    for export in ("vanilla", "remap"):
        out = output_config(source, SourceArchitecture.of(source), maps, method="submoe", export=export,
                            source_path="src", source_bytes=2, weight_bytes=1)
        assert out["num_experts"] == out["num_local_experts"] == 4
    assert parse_block(out).experts_per_layer == (4, 3)
    with pytest.raises(CheckpointFormatError, match="`num_experts` = 4 and `num_local_experts` = 8: .*set both to 4"):
        parse_block({**out, "num_local_experts": 8})


def test_one_family_table_names_every_architecture():
    """One entry per family (submoe_format.families): the config's model_type, the source and the
    plugin architecture each find it, and the plugin registers one class per entry."""
    from submoe_format.families import BY_MODEL_TYPE, BY_PLUGIN, FAMILIES, MIXTRAL
    from vllm_submoe import MODEL_CLASSES
    assert BY_MODEL_TYPE == {f.model_type: f for f in FAMILIES} and BY_MODEL_TYPE["mixtral"] is MIXTRAL
    assert len(BY_PLUGIN) == len(FAMILIES) == len({f.source_architecture for f in FAMILIES})
    assert MODEL_CLASSES == {f.plugin_architecture: f"vllm_submoe.models.classes:{f.plugin_architecture}"
                             for f in FAMILIES}
    assert layout_for(DEEPSEEK) is BY_MODEL_TYPE["deepseek_v2"]


@pytest.mark.parametrize("config, moe", [
    ({"model_type": "mixtral", "num_hidden_layers": 3, "decoder_sparse_step": 2}, [True, True, True]),
    ({"model_type": "qwen2_moe", "num_hidden_layers": 4, "decoder_sparse_step": 2}, [False, True, False, True]),
    ({"model_type": "qwen3_moe", "num_hidden_layers": 3, "decoder_sparse_step": None, "mlp_only_layers": [0]},
     [False, True, True]),
    ({"model_type": "olmoe", "num_hidden_layers": 2, "first_k_dense_replace": 1}, [True, True]),
    ({"model_type": "deepseek_v2", "num_hidden_layers": 5, "first_k_dense_replace": 1, "moe_layer_freq": 2},
     [False, False, True, False, True]),
    ({"model_type": "deepseek_v2", "num_hidden_layers": 2}, [True, True]),
])
def test_moe_layer_rules_read_only_their_familys_fields(config, moe):
    assert layout_for(config).moe_layers(config) == moe
