"""The output directory: a work directory `.DST.partial` beside DST that survives a killed run and
resumes it, renamed to DST only when complete; an existing DST is never lost."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from submoe_format.errors import SubMoEError


class OutputExistsError(SubMoEError):
    """An output directory that must not be written: it exists, overlaps the source, or holds another run."""


REPORT = "compression_report.json"  # what marks a directory as `submoe compress`'s output


def _replaceable(path: Path, marker: str = REPORT) -> bool:
    """--force replaces only what a previous run wrote (or an empty directory), never e.g. ~/models."""
    return path.is_dir() and (not any(path.iterdir()) or (path / marker).is_file())


def check_output_dir(dst: Path, force: bool, protect: Path | None = None, marker: str = REPORT) -> Path:
    """The resolved output path, if writing there is allowed: an existing `dst` is kept unless `force`
    (and then only a previous output); `protect` (the source) can never be the output or inside it."""
    dst = Path(dst).resolve()
    if protect is not None:
        src = Path(protect).resolve()
        if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
            raise OutputExistsError(f"output {dst} overlaps the source {src}: choose an --out outside it")
    if dst.exists():
        if not force:
            raise OutputExistsError(f"output {dst} already exists: choose another --out or pass --force to replace it")
        if not _replaceable(dst, marker):
            what = "`submoe compress` output" if marker == REPORT else f"output of this command (it has {marker})"
            raise OutputExistsError(f"--force replaces only an earlier {what} or an empty directory, "
                                    f"and {dst} is neither: choose another --out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


def swap_into(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` to `dst`; with --force the old `dst` is moved aside first and put
    back if the rename fails, so the user never ends up with neither."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / dst.name)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old / dst.name, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


class Progress:
    """A resumable run's state, `progress.json` in its partial directory: the settings' fingerprint
    and whatever the run records after each finished layer (written atomically)."""

    def __init__(self, directory: Path, fingerprint: dict, state: dict | None = None):
        self.dir, self.fingerprint, self.state = directory, fingerprint, state or {}

    def save(self, **state) -> None:
        self.state = state
        tmp = self.dir / "progress.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, **state}))
        tmp.replace(self.dir / "progress.json")


@contextmanager
def resumable_output_dir(dst: Path, force: bool, fingerprint: dict, restart: bool = False,
                         protect: Path | None = None, marker: str = REPORT):
    """Like `atomic_output_dir`, but the work directory `.{name}.partial` beside `dst` survives a
    failed or killed run, and a later run with the same settings (`fingerprint`) gets its
    `Progress` back to continue from there. Different settings are refused unless `restart`."""
    dst = check_output_dir(dst, force, protect, marker)
    partial = dst.parent / f".{dst.name}.partial"
    progress_file = partial / "progress.json"
    if partial.exists() and (restart or not progress_file.is_file()):
        shutil.rmtree(partial)
    progress = Progress(partial, fingerprint)
    if partial.exists():
        saved = json.loads(progress_file.read_text())
        if saved.pop("fingerprint") != fingerprint:
            raise OutputExistsError(f"{partial} holds a partial run with other settings (model, method, counts, "
                                  f"calibration or seed): rerun with those, or pass --restart to start over")
        progress.state = saved
    partial.mkdir(parents=True, exist_ok=True)
    try:
        yield progress
    except BaseException:
        if not progress.state:  # nothing finished: nothing worth keeping
            shutil.rmtree(partial, ignore_errors=True)
        else:
            print(f"submoe: the finished layers are kept in {partial}: rerun the same command to resume "
                  f"there, or pass --restart to start over", file=sys.stderr)
        raise
    progress_file.unlink(missing_ok=True)  # a replayed run (quality benchmark) never saves progress
    swap_into(partial, dst)


