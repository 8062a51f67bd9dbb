"""Sequential (error-compensating) calibration: each layer calibrated on what the compressed layers
before it produce, its routed experts' target the source model's hidden state."""
import json

import pytest
import torch
from conftest import CALIB
from transformers import AutoTokenizer

from offline.calibration.layers import calibrated_layers
from offline.calibration.windows import calibration_windows
from offline.cli import main as cli
from offline.compress import advance, compress, reduce_group
from offline.evaluate import load_reference
from offline.methods import make_method
from offline.options import CompressOptions, layer_budgets
from offline.source.architecture import SourceArchitecture
from offline.source.checkpoint import LazyCheckpoint


def _hidden_states(model, windows, layer):
    """The hidden states after each decoder layer (not HF's last, which is after the final norm), and
    layer `layer`'s MoE input and output, flattened."""
    seen, hs = {}, []

    def moe(module, args, out):
        seen["in"], seen["out"] = args[0], out[0] if isinstance(out, tuple) else out

    hooks = [model.model.layers[layer].mlp.register_forward_hook(moe)]
    hooks += [l.register_forward_hook(lambda m, a, out: hs.append(out[0] if isinstance(out, tuple) else out))
              for l in model.model.layers]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    return [None, *hs], flat(seen["in"]), flat(seen["out"])


def test_the_compressed_stream_is_the_merged_models_and_targets_are_the_sources(random_source, tmp_path):
    opts = CompressOptions(model=str(random_source), out=tmp_path / "out", method="output-lsq", num_experts=4,
                           calib=CALIB[:2], samples=8, seq_len=64, sequential=True, progress=False)
    compress(opts)
    windows, _ = calibration_windows(AutoTokenizer.from_pretrained(str(random_source)), opts.calib, 8, 64, 0)
    merged_hs, moe_in, moe_out = _hidden_states(load_reference(str(opts.out)), windows, layer=1)
    source_hs, _, _ = _hidden_states(load_reference(str(random_source)), windows, layer=1)

    ckpt = LazyCheckpoint(random_source)
    layers = calibrated_layers(ckpt, windows, opts, sequential=True)
    first = next(layers)
    torch.testing.assert_close(first.sequential.source_activations.tensor, source_hs[1], atol=1e-4, rtol=1e-4)
    method = make_method("output-lsq")
    (result, *_), = reduce_group([first], method, layer_budgets(opts, ckpt, SourceArchitecture.of(ckpt.config), method),
                                 opts)
    advance(first, result, "remap")
    torch.testing.assert_close(first.activations.tensor, merged_hs[1], atol=1e-4, rtol=1e-4)  # the merged model's
    second = next(layers)
    gen = torch.Generator().manual_seed(0)
    torch.randperm(windows.numel(), generator=gen)  # layer 0's draw
    sample = torch.randperm(windows.numel(), generator=gen)[:opts.output_tokens]
    torch.testing.assert_close(second.stats.tokens, moe_in[sample], atol=1e-4, rtol=1e-4)  # compressed path's inputs
    residual = merged_hs[2].reshape(-1, moe_out.shape[-1]) - moe_out  # layer 1's output before its MoE
    target = source_hs[2].reshape(-1, moe_out.shape[-1]) - residual  # what brings it to the source's hidden state
    torch.testing.assert_close(second.stats.moe_output, target[sample], atol=1e-4, rtol=1e-4)


def test_a_failed_sequential_run_resumes_both_streams(random_source, tmp_path, monkeypatch, capsys):
    import offline.compress as c
    args = ["compress", "--model", str(random_source), "--method", "output-lsq", "--num-experts", "4",
            "--calib", *CALIB[:2], "--samples", "8", "--seq-len", "64", "--sequential", "--no-progress",
            "--activation-memory", "0"]
    assert cli([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = c.reduce_group, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("killed")
        return real(*a, **k)

    monkeypatch.setattr(c, "reduce_group", failing)
    with pytest.raises(MemoryError):
        cli([*args, "--out", str(tmp_path / "out")])
    assert (tmp_path / ".out.partial" / "resume-source.f32").is_file()
    assert cli([*args, "--out", str(tmp_path / "out")]) == 0 and len(calls) == 3  # layer 0 not merged again
    a, b = LazyCheckpoint(tmp_path / "out"), LazyCheckpoint(tmp_path / "whole")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    ra, rb = (json.loads((tmp_path / d / "compression_report.json").read_text()) for d in ("out", "whole"))
    assert [l["moe_output_relative_error"] for l in ra["layers"]] == [l["moe_output_relative_error"] for l in rb["layers"]]


def test_sequential_calibration_refuses_what_it_cannot_do(random_source, tmp_path, capsys):
    base = ["compress", "--model", str(random_source), "--out", str(tmp_path / "o"), "--num-experts", "4",
            "--sequential", "--calib", CALIB[0], "--samples", "4", "--seq-len", "32"]
    assert cli([*base, "--method", "submoe", "--adaptive"]) == 2
    assert "--sequential merges a layer before calibrating the next, --adaptive" in capsys.readouterr().err
    assert cli(["compress", "--model", str(random_source), "--out", str(tmp_path / "o"), "--num-experts", "4",
                "--method", "reap", "--sequential", "--stats", str(tmp_path)]) == 2
    assert "cannot reuse --stats" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
