"""Correction vectors (format 4): MoNE's novices and MAN/MSAN's scores against the papers' rules
computed by brute force, the least-squares corrections' optimality, and the reference forward's
correction term against the layer computed by hand. vLLM serving them is in test_methods_served."""
import json

import pytest
import torch
from conftest import CALIB, random_layer

from offline.methods import make_method, reduce_layer
from offline.methods.correction import fit_correction
from offline.methods.output_error import output_error, router_weights, served_weights
from offline.moe_math import expert_forward, weighted_expert_sum


@pytest.fixture(scope="module")
def mone_checkpoint(tmp_path_factory):
    """(a random 2-layer Mixtral, its MoNE 8 -> 3 checkpoint); tests that change it take a copy."""
    from conftest import SHIPPED

    from offline.compress import compress
    from offline.options import CompressOptions
    from offline.synthetic import random_mixtral
    root = tmp_path_factory.mktemp("mone")
    src = random_mixtral(root / "src", SHIPPED, layers=2)
    compress(CompressOptions(model=str(src), out=root / "mone", method="mone", num_experts=3, calib=CALIB[:1],
                             samples=4, seq_len=32, output_tokens=64, progress=False))
    return src, root / "mone"


def _routed(stats):
    """Per expert: the rows routed to it, its outputs there [r, H] (float64), and every token's weight."""
    w, ids = stats.routing(stats.router_logits)
    out = []
    for j in range(stats.router_logits.shape[1]):
        rows = (ids == j).any(1)
        y = expert_forward(stats.tokens[rows], *stats.experts.expert(j)).double()
        out.append((rows, y, (w * (ids == j)).sum(1).double()))
    return out


def test_mone_keeps_the_most_fluctuating_experts_and_serves_the_others_as_their_mean_routed_output():
    """The authors' fusion score (mean routing weight over all tokens x ‖std of the routed output‖)
    and novice (mean routed output), by brute force over a layer whose calibration is its sample."""
    experts, stats = random_layer(seed=21, t=160)
    routed = _routed(stats)
    scores = torch.stack([g.mean() * y.std(0, unbiased=False).norm() for _, y, g in routed])
    r = reduce_layer(make_method("mone"), experts, stats, 3, seed=0)
    kept = torch.argsort(scores, descending=True)[:3].tolist()
    assert sorted(c.kept for c in r.merges) == sorted(kept)
    assert r.constant == sorted(set(range(8)) - set(kept)) and r.dropped == []
    assert all(r.expert_map[i] is None for i in r.constant)
    for j, (_, y, _) in enumerate(routed):
        want = y.mean(0).float() if j in r.constant else torch.zeros(y.shape[1])
        torch.testing.assert_close(r.correction[j], want, atol=1e-5, rtol=1e-4)
    # served: kept experts with their routing weights, each constant expert its novice times its weight
    w = router_weights(stats.routing, stats.router_logits, r)
    by_hand = sum(w[:, j:j + 1] * (r.correction[j] if j in r.constant else
                                   expert_forward(stats.tokens, *experts.expert(j))) for j in range(8))
    served = weighted_expert_sum(stats.tokens, served_weights(stats, r), r.experts) + w @ r.correction
    torch.testing.assert_close(served, by_hand, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method, power", [("man", 1), ("msan", 2)])
def test_man_and_msan_drop_the_experts_with_the_smallest_mean_routed_output_norm(method, power):
    experts, stats = random_layer(seed=22, t=160)
    scores = torch.stack([y.norm(dim=-1).pow(power).mean() for _, y, _ in _routed(stats)])
    r = reduce_layer(make_method(method), experts, stats, 5, seed=0)
    assert sorted(c.kept for c in r.merges) == sorted(torch.argsort(scores, descending=True)[:5].tolist())
    assert len(r.dropped) == 3 and r.correction is None


@pytest.mark.parametrize("method", ["mergemoe", "reap", "mone"])
def test_least_squares_corrections_solve_their_normal_equations_and_only_lower_the_error(method):
    """C minimises ‖R − G C‖²: its gradient Gᵀ(G C − R) vanishes (up to the tiny ridge), and the layer's
    output error with it is below the merge's own (MoNE's means included: the fit may only improve them)."""
    experts, stats = random_layer(seed=23, t=300)
    r = reduce_layer(make_method(method), experts, stats, 4, seed=0)
    c = fit_correction(stats, r)
    g = router_weights(stats.routing, stats.router_logits, r).double()
    residual = stats.moe_output.double() - weighted_expert_sum(stats.tokens, served_weights(stats, r), r.experts)
    grad = g.T @ (g @ c.double() - residual)
    assert grad.abs().max() < 1e-4 * (g.T @ residual).abs().max()
    before = output_error(stats, r)
    r.correction = c
    assert output_error(stats, r) < before


def _copy(checkpoint, tmp_path):
    import shutil
    return shutil.copytree(checkpoint, tmp_path / checkpoint.name)


def test_the_reference_forward_adds_the_correction_to_the_moe_block(mone_checkpoint, tmp_path):
    """A corrected checkpoint's transformers block = the merged experts under the source routing
    + Σ_k w_k C[i_k], computed here by hand from the checkpoint's tensors; zeroing the correction
    tensor changes the block's output (the term is not lost on the way)."""
    from safetensors.torch import load_file, save_file

    from offline.evaluate import load_reference
    from offline.source.architecture import SourceArchitecture
    from offline.source.checkpoint import LazyCheckpoint
    from submoe_format.checkpoint import correction_tensor, parse_block
    src, out = mone_checkpoint[0], _copy(mone_checkpoint[1], tmp_path)
    ckpt = LazyCheckpoint(out)
    block, arch = parse_block(ckpt.config), SourceArchitecture.of(LazyCheckpoint(src).config)
    model = load_reference(str(out))
    x = torch.randn(1, 5, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def block_output(reference, l):
        out = reference.model.layers[l].mlp(x)
        return out[0] if isinstance(out, tuple) else out

    for l in range(2):
        got = block_output(model, l)
        logits = x[0] @ ckpt.get(arch.layout.router_tensor(l)).float().T
        w, ids = arch.routing(logits)
        merged = arch.read_experts(ckpt, l, block.experts_per_layer[l])
        c = ckpt.get(correction_tensor(l)).float()
        want = torch.zeros(5, x.shape[-1])
        for t in range(5):
            for k in range(w.shape[1]):
                i = int(ids[t, k])
                slot = block.expert_maps[l][i]
                out_i = c[i] if slot is None else expert_forward(x[0, t:t + 1], *merged.expert(slot))[0] + c[i]
                want[t] += w[t, k] * out_i
        torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)
        assert set(block.constants(l)) == {i for i, e in enumerate(block.expert_maps[l]) if e is None}
    shard = next(f for f in out.glob("*.safetensors") if correction_tensor(0) in load_file(str(f)))
    tensors = load_file(str(shard))
    tensors[correction_tensor(0)] = torch.zeros_like(tensors[correction_tensor(0)])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert not torch.allclose(block_output(load_reference(str(out)), 0), block_output(model, 0), atol=1e-4)


def test_distillation_starts_from_the_served_model_lowers_held_out_kl_and_rewrites_the_checkpoint(
        mone_checkpoint, tmp_path):
    """The student (merged experts behind the remap, one parameter set per merged expert) computes the
    reference forward's logits before any step; distilling lowers the held-out KL it reports, and the
    rewritten checkpoint's reference forward gives exactly that held-out KL."""
    from offline.distillation import Distillation, distill, kl, student
    from offline.evaluate import load_reference
    src, out = mone_checkpoint[0], _copy(mone_checkpoint[1], tmp_path)
    windows = torch.randint(0, 1000, (10, 24), generator=torch.Generator().manual_seed(0))
    model, experts, corrections = student(out)
    assert set(experts) == set(corrections) == {0, 1} and len(experts[0].gate) == 3
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=windows[:2]).logits,
                                   load_reference(str(out))(input_ids=windows[:2]).logits, atol=1e-5, rtol=1e-4)
    info = distill(out, src, windows, Distillation(steps=20, check_every=5, batch=2))
    assert info["held_out_kl_after"] < info["held_out_kl_before"] and info["held_out_windows"] == 2
    held = windows[torch.arange(10) % 5 == 0]
    with torch.no_grad():
        target = load_reference(str(src))(input_ids=held).logits.float().log_softmax(-1)
        after = kl(load_reference(str(out))(input_ids=held).logits, target).item()
    assert after == pytest.approx(info["held_out_kl_after"], rel=1e-4)


def test_compress_with_distill_steps_reports_and_writes_the_distilled_experts(random_source, tmp_path):
    """`--distill-steps` end to end: the windows are the calibration's own, the report says what the
    held-out KL did, and the written experts are the distilled ones (not the merge's)."""
    from offline.cli import main as cli
    from offline.source.checkpoint import LazyCheckpoint
    args = ["compress", "--model", str(random_source), "--method", "mergemoe", "--num-experts", "4", "--calib",
            CALIB[0], "--samples", "20", "--seq-len", "64", "--no-progress"]
    assert cli([*args, "--out", str(tmp_path / "plain")]) == 0
    assert cli([*args, "--out", str(tmp_path / "distilled"), "--distill-steps", "30"]) == 0
    report = json.loads((tmp_path / "distilled" / "compression_report.json").read_text())
    d = report["distillation"]
    assert d["windows"] == 20 and d["held_out_windows"] == 4 and d["steps"] == 30
    assert d["held_out_kl_after"] < d["held_out_kl_before"]
    # the run's time counts the distillation, and the readable report names its share
    assert report["time_seconds"] > report["reduce_seconds"] + d["seconds"]
    assert f"distillation {d['seconds']:.1f} s" in (tmp_path / "distilled" / "compression_report.md").read_text()
    plain, distilled = LazyCheckpoint(tmp_path / "plain"), LazyCheckpoint(tmp_path / "distilled")
    name = "model.layers.0.block_sparse_moe.experts.0.w2.weight"
    assert not torch.equal(plain.get(name), distilled.get(name))
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(plain.get(router), distilled.get(router))  # only the experts train


@pytest.mark.parametrize("break_it, message", [
    (lambda tensors: tensors.pop("submoe.layers.1.correction"), r"missing tensor\(s\) submoe\.layers\.1\.correction"),
    (lambda tensors: tensors.update({"submoe.layers.1.correction": torch.zeros(8, 8)}),
     r"tensor submoe\.layers\.1\.correction has shape \(8, 8\), expected \(8, 64\)"),
])
def test_a_missing_or_misshaped_correction_is_refused_naming_it(mone_checkpoint, tmp_path, break_it, message):
    from safetensors.torch import load_file, save_file

    from submoe_format.check import check_checkpoint
    out = _copy(mone_checkpoint[1], tmp_path)
    assert check_checkpoint(out).is_corrected(1)
    shard = next(f for f in out.glob("*.safetensors") if "submoe.layers.1.correction" in load_file(str(f)))
    tensors = load_file(str(shard))
    break_it(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in tensors or v != shard.name}
        index.write_text(json.dumps(data))
    with pytest.raises(Exception, match=message):
        check_checkpoint(out)
