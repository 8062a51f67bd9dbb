"""Calibrate once, compress many: `submoe calibrate` and `submoe compress --stats`."""
import json
import shutil

import pytest
import torch
from conftest import CALIB, SHIPPED
from safetensors import safe_open

from offline.cli import main as cli
from offline.source.checkpoint import LazyCheckpoint

CALIBRATION = ["--calib", *CALIB[:2], "--samples", "8", "--seq-len", "64"]  # random_compressed's


@pytest.fixture(scope="module")
def stats_dir(random_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "stats"
    assert cli(["calibrate", "--model", str(random_source), "--out", str(out), *CALIBRATION, "--no-progress"]) == 0
    return out


def _tensors(path):
    ckpt = LazyCheckpoint(path)
    return {n: ckpt.get(n) for n in ckpt.names()}


def _same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "config.json").read_text())["submoe"] == json.loads((b / "config.json").read_text())["submoe"]


def _compress(src, out, method, n, *extra):
    return cli(["compress", "--model", str(src), "--out", str(out), "--method", method, "--num-experts", str(n),
                "--no-progress", *extra])


def test_compress_from_statistics_writes_what_calibrating_writes(random_source, random_compressed, stats_dir,
                                                                   tmp_path):
    """One statistics file serves several methods and ratios, each giving exactly the checkpoint a run
    that calibrates writes; a second run into the same --out (--force) too."""
    out = tmp_path / "from-stats"
    for _ in range(2):
        assert _compress(random_source, out, "submoe", 4, "--stats", str(stats_dir), "--force") == 0
        _same_checkpoint(out, random_compressed)
    report = json.loads((out / "compression_report.json").read_text())
    assert report["calibration"]["statistics_file"] == str(stats_dir) and report["calibration"]["samples"] == 8
    assert report["settings"]["expert_output_tokens"] == 2048
    assert _compress(random_source, tmp_path / "a", "ream", 3, "--stats", str(stats_dir)) == 0
    assert _compress(random_source, tmp_path / "b", "ream", 3, *CALIBRATION) == 0
    _same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_calibrate_resumes_after_a_failure_and_writes_what_one_run_writes(random_source, stats_dir, tmp_path,
                                                                         monkeypatch, capsys):
    import offline.calibrate as sf
    save, calls = sf.save_layer, []

    def failing(stats, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full")
        save(stats, path)

    monkeypatch.setattr(sf, "save_layer", failing)
    out = tmp_path / "stats"
    args = ["calibrate", "--model", str(random_source), "--out", str(out), *CALIBRATION, "--no-progress",
            "--activation-memory", "0"]
    with pytest.raises(OSError, match="disk full"):
        cli(args)
    assert not out.exists() and (tmp_path / ".stats.partial" / "layer-000.safetensors").is_file()
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert cli(args) == 0
    assert calls == ["layer-000.safetensors", "layer-001.safetensors", "layer-001.safetensors"]  # layer 0 not redone
    for f in ("layer-000.safetensors", "layer-001.safetensors"):
        with safe_open(str(out / f), "pt") as a, safe_open(str(stats_dir / f), "pt") as b:
            assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert sorted(p.name for p in out.iterdir()) == ["layer-000.safetensors", "layer-001.safetensors", "statistics.json"]


def test_statistics_that_cannot_serve_a_compression_are_refused(random_source, stats_dir, tmp_path, capsys):
    def refused(args, message):
        assert cli(args) == 2
        assert message in capsys.readouterr().err

    out, stats = tmp_path / "out", ["--stats", str(stats_dir)]
    base = ["compress", "--model", str(random_source), "--out", str(out), "--method", "hc-smoe", "--num-experts", "4"]
    refused([*base, *stats, "--samples", "16"], f"--stats {stats_dir} fixes the calibration, so --samples cannot")
    refused(["compress", "--model", str(SHIPPED), "--out", str(out), "--method", "reap", "--num-experts", "4", *stats],
            f"was calibrated on {random_source}, whose weights or config differ")
    refused([*base, "--stats", str(tmp_path)], "is not a statistics directory: it has no statistics.json")
    few = tmp_path / "few"
    assert cli(["calibrate", "--model", str(random_source), "--out", str(few), *CALIBRATION, "--no-progress",
                "--statistics", "saliency"]) == 0
    refused([*base, "--stats", str(few)], "--method hc-smoe needs the statistics ['mean_outputs'], which")
    assert not out.exists()
    assert _compress(random_source, out, "reap", 4, "--stats", str(few)) == 0  # what it holds is enough for REAP
    broken = tmp_path / "broken"
    shutil.copytree(stats_dir, broken)
    (broken / "layer-001.safetensors").write_bytes(b"\0" * 64)
    refused([*base[:4], str(tmp_path / "out2"), *base[5:], "--stats", str(broken)], "cannot read")
    assert not list(tmp_path.glob(".out2*"))  # refused before anything was written
    refused(["calibrate", "--model", str(random_source), "--out", str(random_source.parent), *CALIBRATION],
            "overlaps the source")
    refused(["calibrate", "--model", str(random_source), "--out", str(out), "--force", *CALIBRATION],
            "--force replaces only an earlier output of this command (it has statistics.json)")
    assert (out / "compression_report.json").is_file()  # a compressed checkpoint is never replaced by statistics
