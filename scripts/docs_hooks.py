"""mkdocs hooks. The CLI reference page is the commands' own `--help`, generated at build time, so
it can never drift from the argparse parsers: a page holding `<!-- cli-reference -->` gets every
`submoe` command's help in its place. The benchmarks' plots are served beside the results pages
(results/*.png), from where the benchmarks write them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- cli-reference -->"


def _help(*command: str) -> str:
    env = {**os.environ, "COLUMNS": "100"}  # argparse wraps to the terminal width: fixed, for a stable page
    proc = subprocess.run([sys.executable, "-m", "submoe", *command, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"submoe {' '.join(command)} --help failed: {proc.stderr[-2000:]}")
    return proc.stdout


def cli_reference() -> str:
    sys.path.insert(0, str(ROOT))
    from submoe.cli import COMMANDS
    parts = ["```text", _help().rstrip(), "```"]
    for name in COMMANDS:
        parts += ["", f"## submoe {name}", "", "```text", _help(name).rstrip(), "```"]
    return "\n".join(parts)


def on_files(files, config):
    from mkdocs.structure.files import File
    for png in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown
