"""`submoe`: compress a Mixture-of-Experts checkpoint, measure what it cost, load-test it served.

    submoe compress --model SRC --out DST --num-experts 4 --calib data/calib/*.jsonl   (the recommended settings)
    submoe calibrate --model SRC --out STATS --calib data/calib/*.jsonl   (then compress --stats STATS)
    submoe eval --model DST --reference SRC --data data/eval/*.jsonl --json eval.json
    submoe loadtest SRC DST --data data/eval/*.jsonl --labels original,compressed --concurrency 1,4,16,64
    submoe check DST

`submoe COMMAND --help` lists a command's options.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from submoe_format.errors import SubMoEError

# command -> ("module:function", whether it takes the command name too, one-line help). The module
# is imported only when its command runs, so `submoe --help` loads neither torch nor the HTTP stack,
# and `submoe compress` no serving code. The function returns the exit status and raises a
# SubMoEError for a user error.
COMMANDS = {
    "compress": ("offline.cli:run", True, "merge experts; write a checkpoint vLLM serves with the plugin"),
    "calibrate": ("offline.cli:run", True, "measure every layer's statistics once; reuse them with compress --stats"),
    "eval": ("offline.cli:run", True, "per-domain perplexity, KL, top-1 agreement against a reference"),
    "loadtest": ("serving.loadtest.cli:main", False, "one seeded workload against each deployment, side by side"),
    "check": ("submoe_format.check:main", False, "validate a compressed checkpoint from its files, as vllm serve does"),
}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="submoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, _, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"submoe: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        ap = _parser()
        if not argv:
            ap.print_help(sys.stderr)
            return 2
        ap.parse_args(argv)  # --help exits 0; an unknown command exits 2 naming the choices
        ap.error(f"unknown arguments: {' '.join(argv)}")
    command = argv[0]
    target, with_name, _ = COMMANDS[command]
    module, function = target.split(":")
    warnings.showwarning = _show_warning
    try:
        return getattr(importlib.import_module(module), function)(argv if with_name else argv[1:])
    except SubMoEError as e:  # every user error, whichever package raised it: one line, status 2
        print(f"submoe {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
