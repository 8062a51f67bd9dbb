"""`submoe compress`, `submoe calibrate` and `submoe eval`: compress a Mixture-of-Experts checkpoint
(calibrating once for many compressions if wished), and measure what it cost.

    submoe compress --model SRC --out DST --num-experts 4 --calib data/calib/*.jsonl   (the recommended settings)
    submoe calibrate --model SRC --out STATS --calib data/calib/*.jsonl
    submoe compress --model SRC --out DST --method reap --num-experts 4 --stats STATS
    submoe eval --model DST --reference SRC --data data/eval/*.jsonl --json eval.json

`submoe` (submoe.cli) dispatches these here; `main` also runs them on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

from submoe_format.errors import SubMoEError

from .calibrate import calibrate
from .calibration.settings import CalibrateOptions, Calibration
from .calibration.stats import ALL_STATISTICS
from .compress import compress
from .evaluate import evaluate, to_table
from .methods import METHODS
from .options import CompressError, CompressOptions
from .presets import DEFAULT as DEFAULT_PRESET
from .presets import PRESETS
from .writing.model_card import CARD, add_quality

DEFAULT = {f.name: f.default for f in fields(Calibration) if f.default is not MISSING}
# Calibration settings: `compress` takes them unless --stats fixes them (None there = not given).
CALIBRATION = ("calib", "samples", "seq_len", "output_tokens")


COMPRESS_EXAMPLES = """example, on the shipped model (8 experts per layer -> 4):

  submoe compress --model models/tiny-mixtral-8e --out tiny-4e --num-experts 4 --calib data/calib/*.jsonl

per-layer counts, and a published method as its authors run it:

  submoe compress --model M --out D --num-experts 6,4,4,3 --calib data/calib/*.jsonl
  submoe compress --model M --out D --method reap --num-experts 4 --calib data/calib/*.jsonl
"""
CALIBRATE_EXAMPLES = """example: calibrate once, then compress many ways from the statistics:

  submoe calibrate --model models/tiny-mixtral-8e --out stats --calib data/calib/*.jsonl
  submoe compress --model models/tiny-mixtral-8e --out tiny-4e --num-experts 4 --stats stats
  submoe compress --model models/tiny-mixtral-8e --out tiny-6e --method reap --num-experts 6 --stats stats
"""
EVAL_EXAMPLES = """example: the compressed model against its source, figures into its model card:

  submoe eval --model tiny-4e --reference models/tiny-mixtral-8e --data data/eval/*.jsonl --card
"""


def _counts(text: str) -> int | list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or a comma-separated list of integers, got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        scale = units.get(text[-1:].upper(), 1)
        return int(float(text[:-1] if text[-1:].upper() in units else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 4G, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="submoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    raw = argparse.RawDescriptionHelpFormatter
    c = sub.add_parser("compress", help="merge experts and write a checkpoint vLLM serves through the plugin",
                       formatter_class=raw, epilog=COMPRESS_EXAMPLES)
    c.add_argument("--model", required=True, help="source checkpoint directory (or hub id)")
    c.add_argument("--out", required=True, type=Path, help="output directory (must not exist unless --force)")
    c.add_argument("--method", metavar="METHOD",
                   help=f"one of: {', '.join(METHODS)}. Without it, the --preset's method and settings "
                        f"(default: {DEFAULT_PRESET}); with it, the method as published unless --preset is given")
    c.add_argument("--preset", choices=list(PRESETS), help="named settings, measured on the stand-ins: "
                   + "; ".join(f"{name}{' (the default)' if name == DEFAULT_PRESET else ''}: {p.help()}"
                               for name, p in PRESETS.items()) + ". Options given explicitly override the preset's")
    c.add_argument("--num-experts", required=True, type=_counts,
                   help="experts per layer after merging: N, or N0,N1,... one per layer")
    _calibration_args(c, given_only=True)
    c.add_argument("--sequential", action="store_true",
                   help="calibrate each layer on the hidden states the compressed layers before it produce, its "
                        "target the source model's hidden state there (error-compensating; about twice the "
                        "calibration work; statistics then depend on the method, so not with --stats)")
    c.add_argument("--stats", metavar="DIR", help="statistics written by `submoe calibrate` for this model: used "
                   "instead of calibrating (any method and ratio; the calibration settings are the file's)")
    m = c.add_argument_group("method options (each applies to the methods named)")
    rank = m.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="submoe: rank kept per merged matrix")
    rank.add_argument("--rank-ratio", type=float, help="submoe: rank kept as a fraction of full rank (default 1)")
    m.add_argument("--adaptive", action="store_true", help="submoe: cluster adjacent layers jointly")
    m.add_argument("--intra-rank-ratio", type=float,
                   help="submoe: Sub-MoE†, whitened low-rank truncation of each merged matrix (written dense)")
    m.add_argument("--align-neurons", action="store_true",
                   help="weight-merging methods: permutation-align intermediate neurons before merging")
    m.add_argument("--hybrid", action="store_true",
                   help="output-lsq: per layer, also try dropping the least salient experts (REAP's score) from "
                        "the top-k, all of the reduction or half of it with the rest merged, and keep whichever "
                        "candidate is closest to the source on held-out tokens")
    m.add_argument("--function-weight", type=float, metavar="W",
                   help="output-lsq: also fit each merged W_D to the cluster's function on every sampled token "
                        "(the members' frequency-weighted output), W times the routed tokens' weight, and let "
                        "MergeMoE's grouping compete (default 0: the routed tokens alone)")
    m.add_argument("--choose-end-to-end", action="store_true", default=None,
                   help="output-lsq: compress with --function-weight 0 and 3 from one calibration and keep the "
                        "one whose next-token distributions on calibration text the calibration did not draw are "
                        "closer to the source's (the source and each candidate run in float32: small models)")
    m.add_argument("--substitute-pruned", action="store_true",
                   help="reap, freq-prune: serve a pruned expert's tokens by the kept expert with the most similar "
                        "outputs (its router row stays) instead of dropping its logit from the top-k (as published)")
    m.add_argument("--group-size", type=int, metavar="C",
                   help="ream: most experts a centroid gathers (default 16, as published; 0: each expert joins "
                        "its closest centroid, MC-SMoE's rule)")
    m.add_argument("--refine-steps", type=int, metavar="S",
                   help="any method: after merging, up to S gradient steps on every merged expert's matrices "
                        "against the source layer's output on the --output-tokens sample, routing fixed; "
                        "held-out tokens decide when to stop (default: the preset's, or 0 with --method)")
    m.add_argument("--distill-steps", type=int, metavar="S",
                   help="any method, last: up to S steps training every merged expert end to end on the source's "
                        "next-token distributions over the calibration windows (the whole model in float32: "
                        "small models); held-out windows decide when to stop")
    m.add_argument("--correct", action="store_true", default=None,
                   help="any method: last, fit one correction vector per router expert by least squares on the "
                        "layer's output, added with the expert's routing weight when served (remap export)")
    c.add_argument("--export", choices=("remap", "vanilla", "profile"),
                   help="remap: N-row router + remap tables (vLLM plugin, per-layer counts); vanilla: N'-row "
                        "router, a stock Mixtral any loader reads (router rows of each group's dominant expert, or its "
                        "centroid); profile: remap's tables and only the tensors that changed (none for a pruning), "
                        "the rest read from the unchanged source when served (a few MB per ratio tried)")
    _run_args(c)

    k = sub.add_parser("calibrate", help="measure every MoE layer's statistics once, for `compress --stats`",
                       formatter_class=raw, epilog=CALIBRATE_EXAMPLES)
    k.add_argument("--model", required=True, help="source checkpoint directory (or hub id)")
    k.add_argument("--out", required=True, type=Path, help="statistics directory (must not exist unless --force)")
    _calibration_args(k, given_only=False)
    k.add_argument("--statistics", nargs="+", choices=sorted(ALL_STATISTICS), default=sorted(ALL_STATISTICS),
                   help="all-token statistics to compute (default all: every method can use the file; "
                        "saliency and logit_gram alone skip running every expert on every token)")
    _run_args(k)

    e = sub.add_parser("eval", help="per-domain perplexity, KL and top-1 agreement against a reference",
                       formatter_class=raw, epilog=EVAL_EXAMPLES)
    e.add_argument("--model", required=True)
    e.add_argument("--reference", help="the source checkpoint to compare against")
    e.add_argument("--data", nargs="+", required=True, metavar="FILE", help="one file per domain")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-windows", type=int, default=32, help="windows per domain (default 32)")
    e.add_argument("--json", type=Path, help="write the figures here")
    e.add_argument("--card", action="store_true",
                   help="put the figures in the model card (README.md) `submoe compress` wrote in --model")
    e.add_argument("--no-progress", action="store_true")
    return ap


def _calibration_args(p: argparse.ArgumentParser, given_only: bool) -> None:
    d = {k: None if given_only else DEFAULT.get(k, []) for k in CALIBRATION}
    p.add_argument("--calib", nargs="+", default=d["calib"], metavar="FILE",
                   help=".jsonl/.txt calibration files (one per domain) or hf:DATASET[:CONFIG[:SPLIT]]")
    p.add_argument("--samples", type=int, default=d["samples"],
                   help=f"calibration windows (default {DEFAULT['samples']})")
    p.add_argument("--seq-len", type=int, default=d["seq_len"],
                   help=f"tokens per calibration window (default {DEFAULT['seq_len']})")
    p.add_argument("--output-tokens", type=int, default=d["output_tokens"],
                   help=f"sampled tokens on which every expert's output is measured (default {DEFAULT['output_tokens']})")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=DEFAULT["seed"])
    p.add_argument("--device", default=DEFAULT["device"],
                   help="cpu or cuda[:N]: where each layer is computed (one at a time)")
    big = p.add_argument_group("big models (memory and resuming)")
    big.add_argument("--calib-batch", type=int, default=DEFAULT["calib_batch"],
                     help=f"calibration windows run through a layer at once (default {DEFAULT['calib_batch']})")
    big.add_argument("--activation-memory", type=_bytes, default=DEFAULT["activation_memory"], metavar="SIZE",
                     help=f"calibration activations kept in RAM, e.g. 512M or 4G (default "
                          f"{DEFAULT['activation_memory'] >> 30}G); beyond it they spill to a file in the work directory")
    big.add_argument("--restart", action="store_true",
                     help="discard a partial earlier run of this --out instead of resuming it")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument("--no-progress", action="store_true")


def _compress_calibration(args) -> dict:
    """The calibration settings given to `compress`; with --stats none may be (the file's are used)."""
    given = {k: getattr(args, k) for k in CALIBRATION if getattr(args, k) is not None}
    if args.stats and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CompressError(f"--stats {args.stats} fixes the calibration, so {flags} cannot be given with it: drop "
                            f"{flags}, or calibrate anew (`submoe calibrate` with them, or compress without --stats)")
    return given


def _compress_settings(args) -> dict:
    """The method and its pipeline settings: a preset's (--preset, or the recommended one when no
    --method is given), then what was given explicitly; with --stats the file fixes the calibration."""
    preset = dict(PRESETS[args.preset or DEFAULT_PRESET].settings) if args.preset or not args.method else {}
    if args.stats:
        preset.pop("output_tokens", None)
    given = {k: getattr(args, k) for k in ("method", "refine_steps", "correct", "distill_steps", "export",
                                           "choose_end_to_end")
             if getattr(args, k) is not None}
    return {**preset, **given, **_compress_calibration(args)}


def compress_options(args) -> CompressOptions:
    """`submoe compress`'s parsed arguments as the options `compress` takes."""
    options = {k: getattr(args, k) for k in ("rank", "rank_ratio", "adaptive", "intra_rank_ratio", "align_neurons",
                                             "substitute_pruned", "group_size", "hybrid", "function_weight")}
    return CompressOptions(
        model=args.model, out=args.out, num_experts=args.num_experts, **_compress_settings(args), method_options=options,
        seed=args.seed, device=args.device, force=args.force, stats=args.stats, sequential=args.sequential,
        progress=not args.no_progress, calib_batch=args.calib_batch, activation_memory=args.activation_memory,
        restart=args.restart)


def run(argv: list[str]) -> int:
    """Run `compress ...`, `calibrate ...` or `eval ...`; a user error is raised as a `SubMoEError`."""
    args = _parser().parse_args(argv)
    if args.command == "calibrate":
        meta = calibrate(CalibrateOptions(
            model=args.model, out=args.out, calib=args.calib, samples=args.samples, seq_len=args.seq_len,
            seed=args.seed, output_tokens=args.output_tokens, statistics=frozenset(args.statistics),
            device=args.device, force=args.force, restart=args.restart, progress=not args.no_progress,
            calib_batch=args.calib_batch, activation_memory=args.activation_memory))
        c = meta["calibration"]
        print(f"wrote {args.out}: {len(meta['moe_layers'])} MoE layers, {c['tokens']} calibration tokens, "
              f"{c['seconds']:.1f} s; use it with `submoe compress --stats {args.out}`")
    elif args.command == "compress":
        opts = compress_options(args)
        report = compress(opts)
        s = report["sizes"]
        print(f"wrote {args.out}: experts per layer {s['experts_per_layer']}, "
              f"{s['source_weight_bytes'] / 1e6:.2f} MB -> {s['weight_bytes'] / 1e6:.2f} MB, "
              f"{report['time_seconds']:.1f} s (report: {args.out}/compression_report.md, model card: "
              f"{args.out}/{CARD})")
        print(next_steps(args.model, args.out, opts.export))
    else:
        result = evaluate(args.model, args.data, args.reference, args.seq_len, args.max_windows,
                          progress=not args.no_progress)
        print(to_table(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if args.card:
            add_quality(Path(args.model), to_table(result), args.reference or "nothing (perplexity only)")
            print(f"wrote the figures into {Path(args.model) / CARD}")
    return 0


def next_steps(model: str, out: Path, export: str) -> str:
    serve = f"vllm serve {out}" + ("   # the plugin (this package) serves the remap tables" if export != "vanilla" else "") \
        + (f"; it reads {model} too, so keep that as it is" if export == "profile" else "")
    return "\n".join(["next steps:",
                      f"  submoe check {out}                  # the checks vllm serve runs, in seconds",
                      f"  submoe eval --model {out} --reference {model} --data EVAL.jsonl ... --card",
                      f"  {serve}",
                      f"  submoe loadtest {model} {out} --data EVAL.jsonl --labels original,compressed"])


def main(argv: list[str] | None = None) -> int:
    """`compress ...` / `eval ...` without the `submoe` dispatcher (`python -m offline.cli`, tests):
    reports a user error as `submoe` does, one line and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.showwarning = _show_warning
    try:
        return run(argv)
    except SubMoEError as e:
        print(f"submoe {argv[0] if argv else ''}: error: {e}", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"submoe: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
