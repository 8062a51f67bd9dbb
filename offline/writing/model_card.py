"""The output directory as a Hub model repository: its README.md is a model card written with
huggingface_hub's ModelCard, front matter the Hub reads (base model, library, tags, pipeline) and a
body that says what was done, how to serve it and where it came from. `submoe eval --card` puts its
quality figures in the card's Quality section."""
from __future__ import annotations

import shlex
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from submoe_format.errors import SubMoEError

from .report import choice_summary

CARD = "README.md"
QUALITY = "## Quality"
NOT_MEASURED = ("Not measured yet. `submoe eval --model {dir} --reference {source} --data EVAL.jsonl ... --card` "
                "measures perplexity, KL and top-1 agreement against the source and writes them here.")


def tool_version() -> str:
    try:
        return version("vllm-submoe")
    except PackageNotFoundError:
        return "unknown"


def model_card(report: dict, name: str, command: list[str]) -> ModelCard:
    """The card of a finished compression, from its report and the command that reproduces it."""
    s, settings, calib = report["sizes"], report["settings"], report["calibration"]
    source = report["source"]["path"]
    counts = [n for n in s["experts_per_layer"] if n]
    remap = settings["export"] != "vanilla"  # remap and profile: the plugin serves the tables
    data = ModelCardData(base_model=source, library_name="vllm" if remap else "transformers",
                         pipeline_tag="text-generation", model_name=name,
                         tags=["mixture-of-experts", "moe-compression", "vllm-submoe", report["method"]])
    per_layer = ", ".join(map(str, counts)) if len(set(counts)) > 1 else f"{counts[0]} in every MoE layer"
    serve = (["pip install vllm-submoe   # the plugin that serves the remap tables", f"vllm serve {name}"]
             if remap else [f"vllm serve {name}   # a stock checkpoint: no plugin needed"])
    sources = ", ".join(f"`{v['path']}`" if isinstance(v, dict) else f"`{k}`" for k, v in calib["sources"].items())
    choice = report.get("end_to_end_choice")
    body = "\n".join([
        f"# {name}", "",
        f"`{source}` with its experts reduced by vllm-submoe: "
        f"{report['method_description']}.", "",
        "| | source | this model |", "|---|---:|---:|",
        f"| routed experts per MoE layer | {report['source']['num_experts']} | {per_layer} |",
        f"| weights | {s['source_weight_bytes'] / 1e9:.3f} GB | {s['weight_bytes'] / 1e9:.3f} GB |", "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".", "",
        QUALITY, "", NOT_MEASURED.format(dir=name, source=source), "",
        "## How to serve it", "",
        "```bash", *serve, "```", "",
        ("The router keeps the source's rows; `config.json`'s `submoe` block maps each router expert to "
         "the merged expert that serves it, and the plugin applies it inside vLLM's fused-MoE layer."
         if remap else "The router holds one row per kept expert, so any loader of the source architecture reads it."),
        *(["", f"This is a profile: it stores only the experts the compression changed and reads everything else "
               f"from `{source}` when it is loaded, which must stay where and as it was (the plugin checks its "
               f"files' sizes and headers). Publish a `--export remap` of it instead."]
          if settings["export"] == "profile" else []),
        "",
        "## Provenance", "",
        f"- source checkpoint: `{source}`",
        f"- calibration: {calib['samples']} windows of {calib['seq_len']} tokens from {sources}"
        + (f" (statistics file `{calib['statistics_file']}`)" if "statistics_file" in calib else ""),
        *([f"- end-to-end choice: {choice_summary(choice)}"] if choice else []),
        f"- tool: vllm-submoe {tool_version()}",
        f"- command: `{shlex.join(command)}`",
        "- compression report: `compression_report.md` and `compression_report.json` beside this card", ""])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(report: dict, directory: Path, name: str, command: list[str]) -> None:
    model_card(report, name, command).save(directory / CARD)


class CardError(SubMoEError):
    """A directory whose model card cannot take the figures."""


def add_quality(out_dir: Path, table: str, reference: str) -> None:
    """Replace the card's Quality section by `table` (submoe eval's figures against `reference`)."""
    path = Path(out_dir) / CARD
    if not path.is_file():
        raise CardError(f"{out_dir} has no model card ({CARD}) to put the figures in: --card updates the card "
                        f"`submoe compress` writes; drop --card, or use --json")
    card = ModelCard.load(path)
    head, found, rest = card.text.partition(QUALITY + "\n")
    if not found:
        raise CardError(f"{path} has no `{QUALITY}` section, so it was not written by `submoe compress`: "
                        f"drop --card, or use --json")
    after = rest[rest.find("\n## "):] if "\n## " in rest else ""
    card.text = f"{head}{QUALITY}\n\nMeasured by `submoe eval` against `{reference}`:\n\n{table}\n{after}"
    card.save(path)
