"""`submoe compress --choose-end-to-end`: output-lsq compressed with each of its two fits of W_D,
and the one whose next-token distributions are closer to the source's kept.

Why: fitting W_D also to the cluster's function on every sampled token (`--function-weight 3`)
lowers the KL on the upcycled stand-in and raises it from scratch, and the layer-wise objective
cannot tell which model needs which: the held-out layer error prefers the routed fit alone on both
(benchmarks/ideas.py). The model's own output can. Both candidates are compressed from one
calibration (its statistics do not depend on the method: `--stats`, or measured once here), then
scored by KL(source ‖ candidate) per token on windows of the calibration text the calibration did
not draw. Like distillation, the scoring runs the whole model in float32 on the CPU (the source
once per candidate, beside it): meant for models that fit there.

    validate  the options, and that the calibration text has windows left over to score on
    calibrate once, into the work directory (unless --stats)
    compress  each fit, as `compress --stats` (resumable, each in its own directory)
    score     both against the source on the left-over windows; the closer one becomes --out
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable

import torch

from .calibrate import calibrate
from .calibration.settings import CalibrateOptions, Calibration
from .calibration.stats_file import META, StatsFile
from .calibration.windows import held_out_windows, source_windows
from .distillation import kl
from .evaluate import load_reference
from .methods import make_method
from .options import CompressError, CompressOptions, layer_budgets
from .source.architecture import SourceArchitecture
from .source.checkpoint import LazyCheckpoint
from .writing.model_card import write_card
from .writing.report import peak_rss_bytes
from .writing.report import write as write_report
from .writing.workdir import REPORT, resumable_output_dir

FITS = {"routed": 0.0, "routed+function": 3.0}  # output-lsq's function_weight of each candidate
SCORED_TOKENS = 16384  # left-over calibration text scored: 64 windows at the default length ...
MIN_WINDOWS = 4  # ... and at least this many


def compress_choosing(opts: CompressOptions, reduce_and_write: Callable[[CompressOptions], dict]) -> dict:
    """`reduce_and_write` (one fit's pipeline) run for each of `FITS` in `opts.out`'s work directory;
    the candidate with the lower KL against the source becomes `opts.out`. Every step is kept in
    the work directory, so a killed run resumes where it stopped. Returns the report."""
    started = time.time()
    source = LazyCheckpoint(opts.model)
    layer_budgets(opts, source, SourceArchitecture.of(source.config), make_method(opts.method, **opts.method_options))
    methods = [make_method(opts.method, **{**opts.method_options, "function_weight": w}) for w in FITS.values()]
    info = StatsFile(opts.stats).calibration if opts.stats else \
        source_windows(source, opts.calib, opts.samples, opts.seq_len, opts.seed)[1]
    windows = held_out_windows(source, info, max(MIN_WINDOWS, SCORED_TOKENS // info["seq_len"]))
    if len(windows) < MIN_WINDOWS:
        fix = (f"calibrate {opts.stats} again with more text or fewer --samples" if opts.stats
               else "give more --calib text or fewer --samples")
        raise CompressError(f"--choose-end-to-end scores the candidates on calibration text the calibration did not "
                            f"draw, and only {len(windows)} window(s) of {info['seq_len']} tokens are left over after "
                            f"its {info['samples']}: {fix}")
    with resumable_output_dir(opts.out, opts.force, opts.fingerprint(), opts.restart, protect=source.dir) as work:
        earlier, state = work.state.get("seconds", 0.0), dict(work.state)

        def save(**more) -> None:  # from the start: a killed run keeps its calibration and candidates
            state.update(more, seconds=earlier + time.time() - started)
            work.save(**state)
        save()
        stats = Path(opts.stats) if opts.stats else work.dir / "statistics"
        candidates = {name: work.dir / "candidates" / name for name in FITS}
        if "chosen" not in state:
            if not (stats / META).is_file():
                calibration = {f.name: getattr(opts, f.name) for f in fields(Calibration)}
                calibrate(CalibrateOptions(**{**calibration, "out": stats, "force": True},
                                           statistics=frozenset().union(*(m.statistics for m in methods))))
            for name, weight in FITS.items():
                if not (candidates[name] / REPORT).is_file():
                    reduce_and_write(replace(opts, out=candidates[name], stats=str(stats), choose_end_to_end=False,
                                             distill_steps=0, force=True, restart=False,
                                             method_options={**opts.method_options, "function_weight": weight}))
            t0 = time.time()
            kls = next_token_kls(source.dir, candidates, windows)
            save(chosen=min(kls, key=kls.get), kl=kls, scoring_seconds=time.time() - t0)
        chosen = state["chosen"]
        if candidates[chosen].exists():  # the kept candidate's files become the output's
            for f in candidates[chosen].iterdir():
                f.rename(work.dir / f.name)
        report = json.loads((work.dir / REPORT).read_text())
        if not opts.stats:  # its statistics lived in the work directory: the calibration was this run's
            calibration = report["calibration"]
            calibration.pop("statistics_file", None)
            calibration["seconds"] = calibration.pop("calibrate_seconds", calibration["seconds"])
        report["end_to_end_choice"] = {
            "chosen": chosen, "function_weight": FITS[chosen],
            "kl": {n: round(v, 6) for n, v in state["kl"].items()},  # per token, on the left-over windows
            "windows": len(windows), "tokens": windows.numel(), "seconds": round(state["scoring_seconds"], 2)}
        report.update(time_seconds=round(earlier + time.time() - started, 2), peak_rss_bytes=peak_rss_bytes())
        write_report(report, work.dir)
        write_card(report, work.dir, Path(opts.out).name, opts.command())
        shutil.rmtree(work.dir / "candidates", ignore_errors=True)
        if not opts.stats:
            shutil.rmtree(stats, ignore_errors=True)
    return report


@torch.no_grad()
def next_token_kls(source_dir: Path, candidates: dict[str, Path], windows: torch.Tensor,
                   batch: int = 8) -> dict[str, float]:
    """Each candidate's mean KL(source ‖ candidate) per token of the next-token distributions on
    `windows`; the source and one candidate held at a time."""
    teacher, out = load_reference(str(source_dir)), {}
    for name, directory in candidates.items():
        model, total = load_reference(str(directory)), 0.0
        for w in windows.split(batch):
            total += kl(model(input_ids=w).logits, teacher(input_ids=w).logits.float().log_softmax(-1),
                        reduction="sum").item()
        out[name] = total / windows.numel()
        del model
    return out
