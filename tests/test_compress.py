"""`submoe compress` / `submoe eval` end to end on a random Mixtral, and every bad input."""
import json
import re
import shutil

import pytest
import torch
from conftest import CALIB, EVAL, tree_digest, write_config
from reference import moe_forward
from safetensors import safe_open

from offline.cli import main as cli
from offline.evaluate import evaluate, load_reference
from offline.source.architecture import SourceArchitecture
from offline.source.checkpoint import LazyCheckpoint
from submoe_format.checkpoint import expected_expert_tensors, layout_for, parse_block


def test_compressed_checkpoint_is_complete_and_source_untouched(random_source, tmp_path):
    before = tree_digest(random_source)
    out = tmp_path / "c"
    assert cli(["compress", "--model", str(random_source), "--out", str(out), "--method", "submoe",
                "--num-experts", "3,5", "--calib", *CALIB[:2], "--samples", "8", "--seq-len", "64",
                "--no-progress"]) == 0
    assert tree_digest(random_source) == before
    config = json.loads((out / "config.json").read_text())
    block = parse_block(config)
    assert block.experts_per_layer == (3, 5) and config["num_local_experts"] == 5
    assert config["architectures"] == ["SubMoEMixtralForCausalLM"] and config["model_type"] == "mixtral"
    expected = expected_expert_tensors(config, block)
    ckpt = LazyCheckpoint(out)
    for name, shape in expected.items():
        assert tuple(ckpt.get(name).shape) == shape
    assert {n for n in ckpt.names() if ".block_sparse_moe." in n} == set(expected)  # nothing stale or extra
    assert set(ckpt.names()) - set(expected) == set(LazyCheckpoint(random_source).names()) - {
        n for n in LazyCheckpoint(random_source).names() if ".block_sparse_moe." in n}
    report = json.loads((out / "compression_report.json").read_text())
    assert report["sizes"]["experts_per_layer"] == [3, 5]
    assert report["sizes"]["weight_bytes"] < report["sizes"]["source_weight_bytes"]
    assert report["peak_rss_bytes"] > 0 and len(report["layers"]) == 2
    assert (out / "compression_report.md").read_text().startswith("# Compression report: submoe")
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".c.partial-*"))


def test_compression_is_deterministic_given_a_seed(random_source, random_compressed, tmp_path):
    from offline.compress import compress
    from offline.options import CompressOptions
    out = tmp_path / "again"
    compress(CompressOptions(model=str(random_source), out=out, method="submoe", num_experts=4,
                             calib=CALIB[:2], samples=8, seq_len=64, progress=False))
    a, b = LazyCheckpoint(random_compressed), LazyCheckpoint(out)
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert torch.equal(a.get(n), b.get(n)), n
    assert json.loads((out / "config.json").read_text())["submoe"]["layers"] == \
        json.loads((random_compressed / "config.json").read_text())["submoe"]["layers"]


def test_reference_forward_applies_the_remap(random_source, random_compressed):
    """The eval model of a merged checkpoint equals moe_forward with the merged experts + map."""
    ckpt = LazyCheckpoint(random_compressed)
    ref = load_reference(str(random_compressed))
    block = parse_block(ckpt.config)
    layer = ref.model.layers[0]
    x = torch.randn(10, ckpt.config["hidden_size"], generator=torch.Generator().manual_seed(1))
    experts = SourceArchitecture.of(ckpt.config).read_experts(ckpt, 0, block.experts_per_layer[0])
    router = ckpt.get(layout_for(ckpt.config).router_tensor(0))
    with torch.no_grad():
        ours = moe_forward(x, router, experts, 2, torch.tensor(block.expert_maps[0]))
        torch.testing.assert_close(layer.mlp(x.unsqueeze(0))[0], ours, atol=1e-5, rtol=1e-4)


def test_eval_against_itself_is_exact_and_against_compressed_is_not(random_source, random_compressed):
    same = evaluate(str(random_source), EVAL[:1], reference=str(random_source), seq_len=64, max_windows=2,
                    progress=False)
    d = next(iter(same["domains"].values()))
    assert d["kl"] == pytest.approx(0, abs=1e-6) and d["top1_agreement"] == 1.0
    assert d["perplexity"] == pytest.approx(d["reference_perplexity"])
    merged = evaluate(str(random_compressed), EVAL[:1], reference=str(random_source), seq_len=64,
                      max_windows=2, progress=False)
    assert next(iter(merged["domains"].values()))["kl"] > 1e-4


def _compress_args(src, out, *extra):
    return ["compress", "--model", str(src), "--out", str(out), "--method", "submoe", "--num-experts", "4",
            "--calib", CALIB[0], "--samples", "4", "--seq-len", "32", "--no-progress", *extra]


def _output_lsq(args, *extra):
    args[args.index("submoe")] = "output-lsq"
    args.extend(extra)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.__setitem__(a.index("submoe"), "magic"), "unknown method 'magic'; choose one of: submoe"),
    (lambda a: a.__setitem__(a.index("--num-experts") + 1, "8"), "--num-experts must be between 1 and 7"),
    (lambda a: a.__setitem__(a.index("--num-experts") + 1, "4,4,4"), "lists 3 counts but the model has 2 layers"),
    (lambda a: a.__setitem__(a.index("--model") + 1, "/nonexistent/model"), "is not a directory"),
    (lambda a: a.__setitem__(a.index("--calib") + 1, "/nonexistent/calib.jsonl"),
     "data file /nonexistent/calib.jsonl does not exist"),
    (lambda a: a.remove("--calib") or a.remove(CALIB[0]), "no calibration data: pass --calib"),
    (lambda a: a.append("--rank-ratio") or a.append("0"), "--rank-ratio must be in"),
    (lambda a: a.__setitem__(a.index("submoe"), "reap") or a.append("--align-neurons"),
     "--align-neurons does not apply to --method reap"),
    (lambda a: a.__setitem__(a.index("--num-experts") + 1, "3,5") or a.extend(["--export", "vanilla"]),
     "--export vanilla writes a stock MixtralForCausalLM, whose layers all have the same expert count"),
    (lambda a: a.__setitem__(a.index("--num-experts") + 1, "1") or a.extend(["--export", "vanilla"]),
     "--export vanilla needs at least top_k=2 experts per layer"),
    (lambda a: a.extend(["--adaptive"]) or a.__setitem__(a.index("--num-experts") + 1, "3,5"),
     "--adaptive clusters adjacent layers jointly, so their --num-experts must be equal"),
    (lambda a: a.extend(["--refine-steps", "-1"]), "--refine-steps must be >= 0"),
    (lambda a: a.__setitem__(a.index("submoe"), "mone") or a.extend(["--export", "vanilla"]),
     "--method mone serves pruned experts as constant vectors (.*) --export vanilla cannot carry them"),
    (lambda a: a.extend(["--correct", "--export", "profile"]), "--correct writes correction vectors"),
    (lambda a: a.extend(["--correct", "--sequential"]), "which --sequential calibration does not carry"),
    (lambda a: a.extend(["--distill-steps", "-1"]), "--distill-steps must be >= 0"),
    (lambda a: a.extend(["--distill-steps", "5", "--export", "vanilla"]), "--export vanilla does not hold them so"),
    (lambda a: a.append("--choose-end-to-end"), "--choose-end-to-end chooses between output-lsq's two fits of W_D"),
    (lambda a: _output_lsq(a, "--choose-end-to-end", "--function-weight", "1"), "sets --function-weight itself"),
    (lambda a: _output_lsq(a, "--choose-end-to-end", "--sequential"), "which --sequential makes depend on the fit"),
    (lambda a: _output_lsq(a, "--function-weight", "-1"), "--function-weight must be a number >= 0"),
    (lambda a: _output_lsq(a, "--choose-end-to-end", "--samples", "100000"),
     "only 0 window(s) of 32 tokens are left over"),
    (lambda a: a.insert(a.index("--calib") + 1, CALIB[0]), "is given twice: rename or merge those files"),
])
def test_bad_cli_input_gives_one_clear_error_and_no_output(random_source, tmp_path, capsys, change, message):
    args = _compress_args(random_source, tmp_path / "out")
    change(args)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("submoe compress: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err) if "(.*)" in message else message in err, err
    assert list(tmp_path.iterdir()) == []


def test_choose_end_to_end_keeps_the_fit_closer_to_the_source_on_left_over_calibration_text(random_source, tmp_path):
    """--choose-end-to-end: both of output-lsq's fits compressed from one calibration; the kept
    checkpoint's KL, recomputed here on calibration windows the calibration did not draw, is the
    lower of the two the report gives, and neither candidate nor the statistics are left behind.
    From `submoe calibrate`'s statistics of the same settings (--stats) it chooses alike and leaves
    them as they were."""
    from offline.calibration.windows import held_out_windows, windows_of
    from offline.choice import FITS, MIN_WINDOWS, SCORED_TOKENS, next_token_kls
    from offline.source.checkpoint import LazyCheckpoint
    out = tmp_path / "chosen"
    args = _compress_args(random_source, out, "--choose-end-to-end")
    _output_lsq(args)
    args[args.index("--samples") + 1], args[args.index("--seq-len") + 1] = "8", "64"
    assert cli(args) == 0
    report = json.loads((out / "compression_report.json").read_text())
    c = report["end_to_end_choice"]
    assert set(c["kl"]) == set(FITS) and c["chosen"] == min(c["kl"], key=c["kl"].get)
    assert report["settings"]["function_weight"] == c["function_weight"] == FITS[c["chosen"]]
    source = LazyCheckpoint(random_source)
    held = held_out_windows(source, report["calibration"], max(MIN_WINDOWS, SCORED_TOKENS // 64))
    used = windows_of(source, report["calibration"])
    assert len(held) == c["windows"] >= 4 and not (held[:, None] == used[None]).all(-1).any()
    assert next_token_kls(random_source, {"kept": out}, held)["kept"] == pytest.approx(c["kl"][c["chosen"]], rel=1e-4)
    assert not (out / "candidates").exists() and not (out / "statistics").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["chosen"]  # no work directory either
    card = (out / "README.md").read_text()
    assert "--choose-end-to-end" in card and f"the `{c['chosen']}` fit of W_D kept" in card
    assert "end-to-end choice" in (out / "compression_report.md").read_text()
    calibration = args[args.index("--calib"):args.index("--no-progress")]
    assert cli(["calibrate", "--model", str(random_source), "--out", str(tmp_path / "stats"), *calibration,
                "--no-progress"]) == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "stats").iterdir())
    args = _compress_args(random_source, tmp_path / "from-stats", "--choose-end-to-end", "--stats",
                          str(tmp_path / "stats"))
    args[args.index("--calib"):args.index("--no-progress")] = []
    _output_lsq(args)
    assert cli(args) == 0
    again = json.loads((tmp_path / "from-stats" / "compression_report.json").read_text())["end_to_end_choice"]
    assert again["chosen"] == c["chosen"] and again["kl"] == pytest.approx(c["kl"], rel=1e-4)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "stats").iterdir()) == before


def test_choose_end_to_end_resumes_a_killed_run_without_redoing_what_it_finished(random_source, tmp_path):
    """Killed while compressing the second fit, the run keeps its calibration and the first fit;
    the same command then compresses the second fit only and chooses."""
    import time

    from offline.calibration.stats_file import META
    from offline.choice import FITS, compress_choosing
    from offline.compress import reduce_and_write
    from offline.options import CompressOptions
    opts = CompressOptions(model=str(random_source), out=tmp_path / "out", method="output-lsq", num_experts=4,
                           calib=CALIB[:1], samples=8, seq_len=64, choose_end_to_end=True, progress=False)
    fits = []

    def killed_at_the_second(o):
        fits.append(o.method_options["function_weight"])
        if len(fits) == 2:
            raise KeyboardInterrupt
        return reduce_and_write(o, time.time())
    with pytest.raises(KeyboardInterrupt):
        compress_choosing(opts, killed_at_the_second)
    work = tmp_path / ".out.partial"
    kept = [work / "statistics" / META, work / "candidates" / "routed" / "compression_report.json"]
    stamps = [f.stat().st_mtime_ns for f in kept]
    resumed = []

    def resumed_at_the_second(o):  # what the first run finished is still there, untouched
        resumed.append((o.method_options["function_weight"], [f.stat().st_mtime_ns for f in kept]))
        return reduce_and_write(o, time.time())
    report = compress_choosing(opts, resumed_at_the_second)
    assert resumed == [(FITS["routed+function"], stamps)]
    assert set(report["end_to_end_choice"]["kl"]) == set(FITS) and not work.exists()
    assert (tmp_path / "out" / "compression_report.json").is_file()


@pytest.mark.parametrize("content, message", [
    ("", "holds no text"),
    ('{"txt": "x"}\n', "expected a JSON object with a 'text' field"),
    ('{"text": "tiny"}\n', "fewer than one window"),
])
def test_unusable_calibration_files_are_refused(random_source, tmp_path, capsys, content, message):
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    args = _compress_args(random_source, tmp_path / "out")
    args[args.index("--calib") + 1] = str(calib)
    assert cli(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_overwritten_without_force(random_source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli(_compress_args(random_source, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(_compress_args(random_source, out, "--force")) == 2  # not an earlier output: refused
    assert "replaces only an earlier `submoe compress` output" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert cli(_compress_args(random_source, out, "--force")) == 0  # empty: fine
    first = tree_digest(out)
    assert cli(_compress_args(random_source, out, "--force", "--seed", "1")) == 0  # an earlier output: replaced
    assert (out / "config.json").is_file() and tree_digest(out) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial / .old leftovers


def test_output_inside_or_equal_to_the_source_is_refused(random_source, tmp_path, capsys):
    for out in (random_source, random_source / "sub"):
        assert cli(_compress_args(random_source, out, "--force")) == 2
        assert "overlaps the source" in capsys.readouterr().err
    assert not (random_source / "sub").exists()


def test_seq_len_and_missing_tokenizer_are_refused(random_source, tmp_path, capsys):
    args = _compress_args(random_source, tmp_path / "out")
    args[args.index("--seq-len") + 1] = "0"
    assert cli(args) == 2
    assert "--seq-len must be at least 2" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(random_source, bare)
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    assert cli(_compress_args(bare, tmp_path / "out")) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def _checkpoint_tensors(path):
    ckpt = LazyCheckpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def test_failed_run_keeps_finished_layers_and_the_same_command_resumes_there(random_source, tmp_path, capsys):
    """A run that dies in layer 1 leaves no --out, only the hidden work directory with layer 0 done;
    once the source is mended, the same command continues from layer 1 and writes what an
    uninterrupted run writes."""
    broken = tmp_path / "broken"
    shutil.copytree(random_source, broken)
    from safetensors.torch import save_file
    name = "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    with safe_open(str(broken / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if k != name}, str(broken / "model.safetensors"))
    out = tmp_path / "out"
    assert cli(_compress_args(broken, out, "--activation-memory", "0")) == 2
    err = capsys.readouterr().err
    assert f"missing tensor {name}" in err and "rerun the same command to resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial", "broken"]
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["layers_done"] == 1
    save_file(tensors, str(broken / "model.safetensors"))  # mended
    assert cli(_compress_args(broken, out, "--activation-memory", "0")) == 0
    assert "resuming" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]
    whole = tmp_path / "whole"
    assert cli(_compress_args(broken, whole)) == 0  # in RAM, never interrupted
    a, b = _checkpoint_tensors(out), _checkpoint_tensors(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["submoe"]["layers"] == \
        json.loads((whole / "config.json").read_text())["submoe"]["layers"]
    assert not list(out.glob("*.f32")) and not (out / "progress.json").exists()


def test_a_partial_run_with_other_settings_is_not_resumed(random_source, tmp_path, capsys):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"fingerprint": {"seed": 99}, "layers_done": 1}))
    out = tmp_path / "out"
    assert cli(_compress_args(random_source, out)) == 2
    assert "holds a partial run with other settings" in capsys.readouterr().err
    assert cli(_compress_args(random_source, out, "--restart")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_batched_and_spilled_calibration_gives_the_same_checkpoint(random_source, tmp_path):
    """Windows one at a time with activations in files: the statistics, hence the merge, are the
    all-at-once in-RAM ones (sampled tokens kept in the same order)."""
    from transformers import AutoTokenizer

    from offline.calibration.layers import calibrated_layers
    from offline.calibration.windows import calibration_windows
    from offline.options import CompressOptions
    opts = CompressOptions(model=str(random_source), out=tmp_path / "x", method="submoe", num_experts=4,
                           calib=CALIB[:2], samples=8, seq_len=64, progress=False)
    windows, _ = calibration_windows(AutoTokenizer.from_pretrained(str(random_source)), opts.calib, 8, 64, 0)
    ckpt = LazyCheckpoint(random_source)
    whole = list(calibrated_layers(ckpt, windows, opts))
    opts.calib_batch, opts.activation_memory = 1, 0
    spilled = list(calibrated_layers(ckpt, windows, opts, workdir=tmp_path))
    assert spilled[0].activations.on_disk and (tmp_path / "x-1.f32").stat().st_size == 8 * 64 * 64 * 4
    for a, b in zip(whole, spilled):
        torch.testing.assert_close(a.stats.frequency, b.stats.frequency, atol=0, rtol=0)
        for field in ("tokens", "moe_output", "router_logits", "mean_outputs", "saliency"):
            torch.testing.assert_close(getattr(a.stats, field), getattr(b.stats, field), atol=1e-5, rtol=1e-5)
        for field in ("output_gram", "logit_gram"):
            g = getattr(a.stats, field)
            torch.testing.assert_close(g, getattr(b.stats, field), atol=1e-6 * g.abs().max().item(), rtol=1e-5)


def test_published_statistics_cover_every_calibration_token_not_the_sample(random_source, tmp_path):
    """Frequency, REAP saliency, mean outputs and the two Gram matrices are accumulated over all
    calibration tokens: the size of the per-token sample does not move them, and they equal a
    brute-force pass over every token of the layer."""
    from reference import stats_from_sample
    from transformers import AutoTokenizer

    from offline.calibration.layers import calibrated_layers
    from offline.calibration.windows import calibration_windows
    from offline.options import CompressOptions
    opts = CompressOptions(model=str(random_source), out=tmp_path / "x", method="reap", num_experts=4,
                           calib=CALIB[:2], samples=8, seq_len=64, progress=False, output_tokens=7)
    windows, _ = calibration_windows(AutoTokenizer.from_pretrained(str(random_source)), opts.calib, 8, 64, 0)
    ckpt = LazyCheckpoint(random_source)
    small = next(calibrated_layers(ckpt, windows, opts))
    opts.output_tokens = windows.numel()  # the "sample" is then every token, in some order
    every = next(calibrated_layers(ckpt, windows, opts))
    brute = stats_from_sample(every.stats.tokens, every.experts, every.stats.router_logits, every.stats.routing)
    assert small.stats.tokens.shape[0] == 7
    for field in ("frequency", "mean_outputs", "saliency", "output_gram", "logit_gram"):
        a, b, c = (getattr(s, field).double() for s in (small.stats, every.stats, brute))
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same accumulation, whatever the sample
        torch.testing.assert_close(a, c, atol=1e-5 * c.abs().max().item(), rtol=1e-4)


def test_streaming_holds_one_layer_and_builds_it_without_copies(tmp_path):
    """Memory that stays flat in model size, as behaviour: a layer's experts are freed before the
    next layer is read (nothing in the pipeline keeps a finished group alive), stay in their stored
    dtype (bf16: no float32 copy) as views into the mapped file (no copy at all), transformers'
    layer computes with them as they are, and no other tensor pins the source file's mapping."""
    import gc
    import weakref

    from conftest import SHIPPED
    from transformers import AutoTokenizer

    from offline.calibration.layers import calibrated_layers, in_groups
    from offline.calibration.windows import calibration_windows
    from offline.options import CompressOptions
    from offline.synthetic import random_mixtral
    from offline.writing.output import Clock
    src = random_mixtral(tmp_path / "src", SHIPPED, layers=4, dtype=torch.bfloat16)
    opts = CompressOptions(model=str(src), out=tmp_path / "x", method="submoe", num_experts=4,
                           calib=CALIB[:1], samples=4, seq_len=32, progress=False)
    windows, _ = calibration_windows(AutoTokenizer.from_pretrained(str(src)), opts.calib, 4, 32, 0)
    ckpt = LazyCheckpoint(src)
    arch = SourceArchitecture.of(ckpt.config)
    experts = arch.read_experts(ckpt, 0, 8)
    layer = arch.build_layer(0, {n: ckpt.get(n) for n in arch.non_expert_names(ckpt.names(), 0)}, experts)
    assert layer.mlp.experts.held is experts and experts.gate.dtype == torch.bfloat16
    w3 = ckpt.get("model.layers.0.block_sparse_moe.experts.3.w3.weight")
    assert experts.up[3].data_ptr() == w3.data_ptr()  # a view into the mapped file: the layer is never copied
    assert not experts.up[3].untyped_storage().resizable()
    torch.testing.assert_close(experts.up[[3, 1]], torch.stack([w3, experts.up[1]]), atol=0, rtol=0)
    previous, alive_at_read = [], []
    read = ckpt.get

    def get(name):  # when a layer's first expert is read, is any earlier layer's still alive?
        if name.endswith("experts.0.w1.weight"):
            gc.collect()
            alive_at_read.append(sum(ref() is not None for ref in previous))
        return read(name)
    ckpt.get = get
    for group in in_groups(Clock({}, 0.0).timed(calibrated_layers(ckpt, windows, opts)), 1):  # as compress reads
        # tensors kept past the layer are owned copies (resizable), not views pinning the mapped file
        assert all(t.untyped_storage().resizable() for t in group[0].tensors.values())
        assert group[0].experts.gate.dtype == torch.bfloat16
        previous.append(weakref.ref(group[0].experts.gate))
        del group
    assert alive_at_read == [0, 0, 0, 0]


def test_refinement_lowers_each_layers_held_out_error_and_is_reported(random_source, tmp_path):
    """--refine-steps on top of a merge: each layer's held-out error is never above the merge's, the
    report says what it did, and the layers' output errors on the sample come out lower."""
    from offline.compress import compress
    from offline.options import CompressOptions
    args = dict(model=str(random_source), method="average", num_experts=4, calib=CALIB[:2], samples=16, seq_len=64,
                output_tokens=1024, progress=False)
    plain = compress(CompressOptions(out=tmp_path / "plain", **args))
    refined = compress(CompressOptions(out=tmp_path / "refined", refine_steps=100, **args))
    assert refined["settings"]["refine_steps"] == 100 and "refinement" not in plain["layers"][0]
    for a, b in zip(plain["layers"], refined["layers"]):
        r = b["refinement"]
        assert r["held_out_error_after"] <= r["held_out_error_before"] and r["steps_run"] >= 25
        assert b["expert_map"] == a["expert_map"]  # the grouping is the merge's
    assert sum(b["moe_output_relative_error"] for b in refined["layers"]) < \
        sum(a["moe_output_relative_error"] for a in plain["layers"])


def test_compressing_a_compressed_checkpoint_is_refused(random_compressed, tmp_path, capsys):
    assert cli(_compress_args(random_compressed, tmp_path / "out")) == 2
    assert "already a compressed checkpoint" in capsys.readouterr().err


def test_a_quantized_source_is_refused_before_anything_is_read(random_source, tmp_path, capsys):
    """DeepSeek-V3 on the hub is block-wise FP8: its weights mean nothing without their scales, so
    the compressor names the problem and the fix instead of merging raw FP8 codes."""
    fp8 = tmp_path / "fp8"
    shutil.copytree(random_source, fp8)
    write_config(fp8, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    assert cli(_compress_args(fp8, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "is a quantized checkpoint (fp8 in config.json)" in err and "Dequantize it first" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported_ones(random_source, tmp_path, capsys):
    other = tmp_path / "llama"
    shutil.copytree(random_source, other)
    write_config(other, model_type="llama", architectures=["LlamaForCausalLM"])
    assert cli(_compress_args(other, tmp_path / "out")) == 2
    assert "unsupported architecture model_type='llama'" in capsys.readouterr().err


def test_vanilla_export_is_a_stock_mixtral_with_the_kept_router_rows(random_source, tmp_path):
    """Pruning exported with an N'-row router: stock transformers loads it, and it computes the
    source MoE with the dropped experts' router rows removed."""
    from transformers import AutoModelForCausalLM
    out = tmp_path / "vanilla"
    args = _compress_args(random_source, out, "--export", "vanilla", "--force")
    args[args.index("submoe")] = "reap"
    assert cli(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 4
    assert "submoe" not in config
    report = json.loads((out / "compression_report.json").read_text())
    src, ckpt = LazyCheckpoint(random_source), LazyCheckpoint(out)
    router = layout_for(config).router_tensor
    for l, entry in enumerate(report["layers"]):
        kept = entry["representatives"]
        assert sorted(kept) == sorted(c["kept"] for c in entry["merge"])
        assert torch.equal(ckpt.get(router(l)), src.get(router(l))[kept])
        for j, e in enumerate(kept):
            name = lambda i: f"model.layers.{l}.block_sparse_moe.experts.{i}.w2.weight"  # noqa: E731
            assert torch.equal(ckpt.get(name(j)), src.get(name(e)))
    stock = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, load_reference(str(out))(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-4)


def test_non_finite_source_weights_are_refused(random_source, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(random_source, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"][0, 0] = float("inf")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert cli(_compress_args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "NaN/inf expert outputs in layer 1" in err and "not finite" in err
    assert not (tmp_path / "out").exists()


def test_mergemoe_warns_when_calibration_is_below_the_collapse_threshold(random_source, tmp_path, capsys):
    args = _compress_args(random_source, tmp_path / "out")
    args[args.index("submoe")] = "mergemoe"
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "submoe: warning: mergemoe: least squares on too little calibration: 4 calibration samples" in err


def test_shards_are_bounded_and_a_lazy_stream_is_written_as_it_is_generated(tmp_path):
    """ShardWriter starts a new shard before one would pass its limit (safetensors serialises a
    shard in memory: the limit bounds that copy), consumes (name, tensor) pairs one at a time, and
    indexes every tensor in the shard that holds it."""
    from offline.writing.shards import ShardWriter
    made = []

    def stream():
        for i in range(7):  # shards on disk as each tensor is generated
            made.append(len(list(tmp_path.glob("*.safetensors"))))
            yield f"t{i}", torch.full((250,), float(i))  # 1000 bytes each
    writer = ShardWriter(tmp_path, max_shard_bytes=2500)
    writer.write({"big": torch.zeros(1000)})  # larger than the limit: a shard of its own
    writer.write(stream())
    writer.finish()
    assert made == [1, 1, 1, 2, 2, 3, 3]  # written while the stream is still being generated
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 1 + 4  # big | t0 t1 | t2 t3 | t4 t5 | t6
    assert index["metadata"]["total_size"] == 4000 + 7 * 1000
    for name, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert name in f.keys()
            if name != "big":
                assert torch.equal(f.get_tensor(name), torch.full((250,), float(name[1:])))
    assert all((tmp_path / s).stat().st_size < 2500 + 1000 for s in shards if s != index["weight_map"]["big"])
