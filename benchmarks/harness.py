"""What every benchmark shares, so that none re-implements a pipeline step or hard-codes a machine:

    machine()         where a result was measured, read from the machine: date, commit, CPU model,
                      cores, memory, torch and its threads
    write_results()   the JSON and its Markdown twin, both stamped with machine()
    Calibrations      one statistics file per calibration (`submoe calibrate`), reused by every
                      compression on it (`submoe compress --stats`)
    compressed()      one compression of a stand-in: from the statistics file, or calibrating within
                      the run when its statistics depend on the merges (--sequential)
    Evaluator         a stand-in's held-out evaluation, and its original's figures on it
    cost_run()        a real `submoe compress` in a fresh process: wall time, the report's times, peak memory
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of benchmarks/: its serving.py must not hide the serving package

from offline.calibrate import calibrate
from offline.calibration.settings import CalibrateOptions, Calibration
from offline.calibration.windows import token_windows
from offline.compress import compress
from offline.evaluate import compare, first_divergence, greedy_continuations, load_reference, next_token_logprobs
from offline.options import CompressOptions
from submoe_format.checkpoint import layout_for
from submoe_format.texts import domain_name, read_texts

MODELS = {"upcycled": ROOT / "models" / "tiny-mixtral-8e", "from-scratch": ROOT / "models" / "tiny-mixtral-8e-scratch",
          "fine-grained": ROOT / "models" / "tiny-qwen2-moe-64e"}
CALIB = sorted(str(p) for p in (ROOT / "data" / "calib").glob("*.jsonl"))
EVAL = sorted(str(p) for p in (ROOT / "data" / "eval").glob("*.jsonl"))
RESULTS = ROOT / "benchmarks" / "results"


def source_experts(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return layout_for(config).num_experts(config)


# --- where it ran ------------------------------------------------------------------------------

def machine() -> dict:
    """This machine and checkout, as a results file records them (read when the run starts)."""
    import psutil
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "cpu": _cpu_model(), "cores": cores,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    """HEAD, marked when the code measured differs from it (results files aside)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "--short=10", "HEAD").stdout.strip() or "unknown"
    changed = git("diff", "--quiet", "HEAD", "--", ".", f":(exclude){RESULTS.relative_to(ROOT)}").returncode == 1
    return head + ("+uncommitted changes" if changed else "")


def stamp(m: dict) -> str:
    return (f"Measured {m['date']} at commit {m['commit']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB "
            f"RAM; torch {m['torch']} with {m['torch_threads']} threads.")


def write_results(out_dir: Path, stem: str, result: dict, markdown: str, measured_on: dict | None) -> None:
    """`stem`.json and `stem`.md in `out_dir`, both saying where they were measured (`measured_on`
    None: results kept from before runs were stamped, which say nothing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamped = {"machine": measured_on} if measured_on else {}
    (out_dir / f"{stem}.json").write_text(json.dumps({**stamped, **result}, indent=2) + "\n")
    title, _, rest = markdown.partition("\n")
    (out_dir / f"{stem}.md").write_text(f"{title}\n\n_{stamp(measured_on)}_\n{rest}" if measured_on else markdown)


# --- calibrate once, compress many -------------------------------------------------------------

class Calibrations:
    """The statistics file of one source model, calibrated once per (data, samples, seed, sampled tokens)."""

    def __init__(self, model_dir: Path, tmp: Path, seq_len: int = Calibration.seq_len,
                 output_tokens: int = Calibration.output_tokens):
        self.model_dir, self.dir, self.seq_len, self.output_tokens = model_dir, tmp / "stats", seq_len, output_tokens
        self.key, self.value = None, None

    def get(self, sources: list[str], samples: int, seed: int, output_tokens: int | None = None) -> tuple[Path, dict]:
        """(statistics directory, its calibration with the seconds it took)."""
        output_tokens = output_tokens or self.output_tokens
        key = (tuple(sources), samples, seed, output_tokens)
        if key != self.key:
            t0 = time.time()
            meta = calibrate(CalibrateOptions(model=str(self.model_dir), out=self.dir, calib=sources, samples=samples,
                                              seq_len=self.seq_len, seed=seed, output_tokens=output_tokens,
                                              force=True, progress=False))
            self.key, self.value = key, (self.dir, {**meta["calibration"], "calibration_seconds": time.time() - t0})
        return self.value


def compressed(cal: Calibrations, out: Path, method: str, n: int | list[int], seed: int, sources: list[str],
               samples: int, options: dict | None = None, **pipeline) -> tuple[dict, dict | None]:
    """`submoe compress` of `cal`'s model into `out` (`pipeline`: more CompressOptions, e.g.
    output_tokens, refine_steps, export, sequential): (its report, the calibration it read, or None
    when it calibrated within the run)."""
    output_tokens = pipeline.pop("output_tokens", None)
    if pipeline.get("sequential"):  # statistics that depend on the merges
        calibration, info = dict(calib=sources, samples=samples, seq_len=cal.seq_len,
                                 output_tokens=output_tokens or cal.output_tokens), None
    else:
        stats, info = cal.get(sources, samples, seed, output_tokens)
        calibration = dict(stats=str(stats))
    report = compress(CompressOptions(model=str(cal.model_dir), out=out, method=method, num_experts=n,
                                      method_options=options or {}, seed=seed, force=True, progress=False,
                                      **calibration, **pipeline))
    return report, info


def cost_run(model_dir: Path, method: str, n: int, tmp: Path, extra: tuple[str, ...] = ()) -> dict:
    """A real `submoe compress` in a fresh process, the CLI's default calibration on every domain
    (`extra`: more of its options): wall time, the report's calibration and merging times, and peak
    resident memory, as a user sees them."""
    out = tmp / f"cost-{method}"
    cmd = [sys.executable, "-m", "submoe", "compress", "--model", str(model_dir), "--out", str(out), "--method",
           method, "--num-experts", str(n), "--calib", *CALIB, "--no-progress", "--force", *extra]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    report = json.loads((out / "compression_report.json").read_text())
    return {"wall_seconds": round(time.time() - t0, 1), "compress_seconds": report["time_seconds"],
            "calibration_seconds": report["calibration"]["seconds"], "merging_seconds": report["reduce_seconds"],
            "peak_rss_bytes": report["peak_rss_bytes"]}


# --- evaluation ----------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    seq_len: int = Calibration.seq_len
    eval_windows: int = 8  # held-out windows per domain
    prompts_per_domain: int = 2
    prompt_len: int = 32
    new_tokens: int = 32  # greedy continuation per prompt


class Evaluator:
    """The fixed evaluation set of one source model, and its original's figures on it."""

    def __init__(self, model_dir: Path, s: EvalSettings):
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.windows = {domain_name(p): token_windows(tok, read_texts(p), s.seq_len, s.eval_windows) for p in EVAL}
        # Prompts from the end of each domain's evaluation text, not overlapping the scored windows.
        self.prompts = torch.cat([token_windows(tok, read_texts(p)[::-1], s.prompt_len, s.prompts_per_domain)
                                  for p in EVAL])
        self.new_tokens = s.new_tokens
        ref = load_reference(str(model_dir))
        with SharedExpertShare(ref) as self.shared_share:
            self.ref_logp = {d: next_token_logprobs(ref, w) for d, w in self.windows.items()}
        self.ref_greedy = greedy_continuations(ref, self.prompts, self.new_tokens)

    def score(self, model_dir: Path) -> dict:
        model = load_reference(str(model_dir))
        domains = {d: compare(next_token_logprobs(model, w), w, self.ref_logp[d]) for d, w in self.windows.items()}
        div = first_divergence(greedy_continuations(model, self.prompts, self.new_tokens), self.ref_greedy).float()
        ret = [d["perplexity_retention"] for d in domains.values()]
        return {
            "domains": {d: {k: v[k] for k in ("perplexity", "reference_perplexity", "kl", "top1_agreement")}
                        for d, v in domains.items()},
            "kl": statistics.fmean(d["kl"] for d in domains.values()),
            "top1_agreement": statistics.fmean(d["top1_agreement"] for d in domains.values()),
            "perplexity_mean": statistics.fmean(d["perplexity"] for d in domains.values()),
            "retention_mean": statistics.fmean(ret), "retention_worst": min(ret),
            "worst_domain": min(domains, key=lambda d: domains[d]["perplexity_retention"]),
            "greedy_first_divergence": div.mean().item(),
            "greedy_identical": (div == self.new_tokens).float().mean().item(),
        }

    def original(self) -> dict:
        ppl = [math.exp(-lp[:, :-1].gather(-1, w[:, 1:, None]).mean().item())
               for lp, w in zip(self.ref_logp.values(), self.windows.values())]
        return {"kl": 0.0, "top1_agreement": 1.0, "perplexity_mean": statistics.fmean(ppl), "retention_mean": 1.0,
                "retention_worst": 1.0, "greedy_first_divergence": float(self.new_tokens), "greedy_identical": 1.0,
                "domains": {d: {"perplexity": p} for d, p in zip(self.windows, ppl)}}


class SharedExpertShare:
    """Per MoE layer, the shared expert's share of the MoE block's output energy, E|shared|^2 / E|out|^2
    over every evaluated token: the part of each layer no routed-expert merge can touch (0 without one)."""

    def __init__(self, model):
        self.blocks = [l.mlp for l in model.model.layers if hasattr(l.mlp, "gate")]  # the layers that route
        self.shared = [0.0] * len(self.blocks)
        self.total = [0.0] * len(self.blocks)

    def __enter__(self):
        self.hooks = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def _hook(self, i: int):
        def hook(block, args, out):
            x, y = args[0], out[0] if isinstance(out, tuple) else out
            if getattr(block, "shared_expert", None) is not None:
                shared = block.shared_expert(x) * torch.sigmoid(block.shared_expert_gate(x))
                self.shared[i] += shared.float().pow(2).sum().item()
            self.total[i] += y.float().pow(2).sum().item()
        return hook

    def per_layer(self) -> list[float]:
        return [s / t for s, t in zip(self.shared, self.total)]
