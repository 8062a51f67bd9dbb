"""The quality benchmark's harness: its --quick run end to end, and its scoring against itself."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SHIPPED

sys.path.insert(0, str(ROOT / "benchmarks"))
import harness
import quality


def test_scoring_the_source_against_itself_is_exact():
    s = quality.quick_settings({"upcycled": SHIPPED})
    ev = harness.Evaluator(SHIPPED, s)
    f = ev.score(SHIPPED)
    assert f["kl"] < 1e-6 and f["top1_agreement"] == 1.0 and f["greedy_identical"] == 1.0
    assert f["retention_mean"] == pytest.approx(1.0) and f["retention_worst"] == pytest.approx(1.0)
    assert f["perplexity_mean"] == pytest.approx(ev.original()["perplexity_mean"], rel=1e-6)


def test_quick_run_writes_json_markdown_and_plots_for_every_method(tmp_path):
    assert quality.main(["--quick", "--models", "upcycled", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "quality-quick.json").read_text())
    m = results["models"]["upcycled"]
    labels = {r["label"] for r in m["summary"]}
    assert set(quality.MAIN_METHODS) <= labels
    assert {"submoe+adaptive", "submoe+†", "hc-smoe+align"} <= labels
    for r in m["summary"]:
        assert r["kl"] > 0 and 0 < r["top1_agreement"] < 1, r["label"]
        assert r["retention_worst"] <= r["retention_mean"] and all(math.isfinite(r[f]) for f in quality.FIGURES)
    assert m["original"]["kl"] == 0 and len(m["original"]["domains"]) == len(harness.EVAL)
    assert len(m["ablations"]["samples"]) == 2 and m["ablations"]["samples"][0]["warnings"]  # 4 samples < 36
    # stamped with where it ran, read from this machine
    stamp = results["machine"]
    assert stamp["cores"] == len(os.sched_getaffinity(0)) and stamp["memory_gib"] > 0 and stamp["cpu"]
    assert stamp["commit"].split("+")[0] == subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                                                           capture_output=True, text=True).stdout.strip()
    md = (tmp_path / "quality-quick.md").read_text()
    assert md.splitlines()[2] == f"_{harness.stamp(stamp)}_"
    assert "## Main table" in md and all(f"| {lab} |" in md for lab in labels)
    assert (tmp_path / "quality-quick.png").stat().st_size > 10_000
    assert (tmp_path / "quality-quick_ablations.png").stat().st_size > 10_000
    # --add measures more configurations (one calibrating within its run: sequential) and keeps every
    # earlier row as it was
    more = {"output-lsq@16k", "reap+seq"}
    assert quality.main(["--quick", "--models", "upcycled", "--out", str(tmp_path), "--add", *sorted(more)]) == 0
    added = json.loads((tmp_path / "quality-quick.json").read_text())["models"]["upcycled"]
    assert {r["label"] for r in added["summary"]} == labels | more
    assert [r for r in added["summary"] if r["label"] not in more] == m["summary"]
    new = next(r for r in added["runs"] if r["label"] == "output-lsq@16k")
    assert new["pipeline"]["output_tokens"] == 16384 and new["kl"] > 0 and new["calibration_seconds"] > 0
    seq = next(r for r in added["runs"] if r["label"] == "reap+seq")
    assert seq["pipeline"]["sequential"] and seq["kl"] > 0 and seq["calibration_seconds"] > 0
