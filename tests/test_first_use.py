"""What a newcomer meets: `submoe compress` without --method (the recommended preset), presets whose
quoted figures are the committed results', a Hub model card in every output, the next steps, and a
README whose method table is generated from the results."""
import json
import shlex
import sys

import pytest
from conftest import CALIB, EVAL, ROOT, SHIPPED
from huggingface_hub import ModelCard

from offline.cli import _parser, compress_options
from offline.cli import main as cli
from offline.options import CompressOptions
from offline.presets import DEFAULT, PRESETS

sys.path.insert(0, str(ROOT / "benchmarks"))
import quality

RESULTS = ROOT / "benchmarks" / "results"


def _options(argv: list[str]) -> CompressOptions:
    return compress_options(_parser().parse_args(["compress", *argv]))


@pytest.fixture(scope="module")
def recommended(tmp_path_factory):
    """The shipped model compressed 8->4 with no --method, on a small calibration: (dir, stdout)."""
    out = tmp_path_factory.mktemp("first-use") / "tiny-4e"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["compress", "--model", str(SHIPPED), "--out", str(out), "--num-experts", "4", "--calib", *CALIB[:2],
                    "--samples", "8", "--seq-len", "64", "--no-progress"]) == 0
    return out, buf.getvalue()


def test_without_a_method_the_recommended_preset_runs_and_says_what_comes_next(recommended):
    out, printed = recommended
    report = json.loads((out / "compression_report.json").read_text())
    preset = PRESETS[DEFAULT].settings
    assert report["method"] == preset["method"]
    assert report["settings"]["refine_steps"] == preset.get("refine_steps", 0)
    assert report["settings"]["expert_output_tokens"] == preset.get("output_tokens", 2048)
    assert report["settings"]["export"] == preset.get("export", "remap")
    for step in (f"submoe check {out}", f"submoe eval --model {out} --reference {SHIPPED}", f"vllm serve {out}"):
        assert step in printed, printed


def test_the_output_is_a_hub_model_card_that_reproduces_the_run(recommended):
    out, _ = recommended
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == str(SHIPPED) and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "vllm" and PRESETS[DEFAULT].settings["method"] in card.data.tags
    assert "vllm serve tiny-4e" in card.text and "pip install vllm-submoe" in card.text
    assert "| routed experts per MoE layer | 8 | 4 in every MoE layer |" in card.text
    # the command in the card, parsed again, gives the options of the run that wrote it
    command = card.text.split("- command: `")[1].split("`")[0]
    again = _options(shlex.split(command)[2:])
    report = json.loads((out / "compression_report.json").read_text())
    assert again.method == report["method"] and again.num_experts == 4 and again.calib == CALIB[:2]
    assert again.fingerprint() == _options(["--model", str(SHIPPED), "--out", str(out), "--num-experts", "4",
                                            "--calib", *CALIB[:2], "--samples", "8", "--seq-len", "64"]).fingerprint()


def test_eval_puts_its_figures_in_the_card_and_refuses_a_card_it_did_not_write(recommended, tmp_path, capsys):
    out, _ = recommended
    result = tmp_path / "eval.json"
    assert cli(["eval", "--model", str(out), "--reference", str(SHIPPED), "--data", *EVAL[:2], "--seq-len", "64",
                "--max-windows", "2", "--json", str(result), "--card", "--no-progress"]) == 0
    card = ModelCard.load(out / "README.md")
    quality_section = card.text.split("## Quality")[1].split("\n## ")[0]
    mean = json.loads(result.read_text())["mean"]
    assert f"| mean | {mean['perplexity']:.2f} |" in quality_section and f"{mean['kl']:.4f}" in quality_section
    assert "Not measured yet" not in card.text and "## How to serve it" in card.text  # the rest is kept
    shipped_card = (SHIPPED / "README.md").read_bytes()
    assert cli(["eval", "--model", str(SHIPPED), "--data", EVAL[0], "--seq-len", "64", "--max-windows", "1",
                "--card", "--no-progress"]) == 2
    assert "has no `## Quality` section" in capsys.readouterr().err
    assert (SHIPPED / "README.md").read_bytes() == shipped_card


@pytest.mark.parametrize("argv, expected", [
    ([], PRESETS[DEFAULT].settings),
    (["--method", "reap"], {"method": "reap", "refine_steps": 0, "output_tokens": 2048, "export": "remap"}),
    (["--preset", "fast"], PRESETS["fast"].settings),
    (["--preset", "stock", "--method", "average"], {**PRESETS["stock"].settings, "method": "average"}),
    (["--refine-steps", "7"], {**PRESETS[DEFAULT].settings, "refine_steps": 7}),
])
def test_a_preset_fills_what_was_not_given(argv, expected):
    opts = _options(["--model", "M", "--out", "D", "--num-experts", "4", *argv])
    assert {k: getattr(opts, k) for k in expected} == expected


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_presets_quoted_figures_are_the_committed_results(name):
    """`--help` quotes each preset's mean KL at 50% of the experts and its cost: they must be what
    benchmarks/results/quality.json and method_cost.json say."""
    preset = PRESETS[name]
    rows = quality.half_rows(json.loads((RESULTS / "quality.json").read_text()))[preset.label]
    assert preset.kl == tuple(round(rows[m]["kl"], 3) for m in ("upcycled", "from-scratch", "fine-grained"))
    cost = {r["config"]: r for r in json.loads((RESULTS / "method_cost.json").read_text())["rows"]
            if r["model"].startswith("upcycled")}
    assert preset.compress_seconds == round(cost[preset.label]["compress_seconds"])
    assert f"{preset.kl[0]:.3f}" in preset.help() and f"{preset.compress_seconds} s" in preset.help()


def test_the_readme_method_table_is_generated_from_the_results():
    results = json.loads((RESULTS / "quality.json").read_text())
    cost = json.loads((RESULTS / "method_cost.json").read_text())["rows"]
    readme = (ROOT / "README.md").read_text()
    assert quality.README_MARKERS[0] in readme
    assert quality.readme_with(quality.method_table(results, cost), readme) == readme
    assert len(readme.encode()) <= 12288
