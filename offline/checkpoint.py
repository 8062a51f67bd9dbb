"""Checkpoint I/O at the edges: lazy safetensors reads of a source, atomic writes of a result.

Reads go through `safe_open` (memory-mapped): a tensor is materialised only when asked for,
so a compressor holds one decoder layer at a time, whatever the model size.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_submoe.checkpoint_format import safetensors_bytes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


class CheckpointError(ValueError):
    """A source checkpoint that cannot be read, with what to do about it."""


def resolve_model_dir(spec: str) -> Path:
    """A local directory, or a hub id resolved through the local Hugging Face cache / download."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists() or spec.startswith((".", "/")) or spec.count("/") != 1:
        raise CheckpointError(f"model {spec} is not a directory with config.json and *.safetensors "
                              f"(pass a local checkpoint directory or a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as e:  # network, auth, missing repo: one message either way
        raise CheckpointError(f"could not fetch {spec} from the hub ({type(e).__name__}: {e}); "
                              f"download it first and pass the local directory") from None


class LazyCheckpoint:
    """Name -> tensor access over one or many safetensors files, without loading them."""

    def __init__(self, model_dir: str | Path):
        self.dir = resolve_model_dir(str(model_dir))
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.dir} has no config.json: not a Hugging Face checkpoint directory")
        self.config = json.loads(config_path.read_text())
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir} has no *.safetensors weights (only safetensors are read; "
                                  f"convert .bin checkpoints first)")
        self._file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    self._file_of[name] = f
        self._handles: dict[Path, object] = {}

    def has_tokenizer(self) -> bool:
        return any((self.dir / n).is_file() for n in TOKENIZER_FILES[:2])

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor: a view into the memory-mapped file (safetensors maps without copying),
        valid after `release()` but keeping the whole file mapped while it lives."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.dir} is missing tensor {name}")
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name)

    def release(self) -> None:
        """Close the memory-mapped files: pages read so far stop counting as this process's memory
        (called after each layer, so resident memory does not grow with the model). A file stays
        mapped while a tensor from `get` lives: clone what must outlive the layer."""
        self._handles.clear()

    def nbytes(self) -> int:
        return safetensors_bytes(self.dir)


class ShardWriter:
    """Writes tensors shard by shard (one shard per call) plus the safetensors index."""

    def __init__(self, out_dir: Path, state: dict | None = None):
        """`state` (from `.state()`) continues an interrupted run's shards."""
        self.out_dir = out_dir
        state = state or {}
        self.weight_map: dict[str, str] = dict(state.get("weight_map", {}))
        self.total_bytes = state.get("total_bytes", 0)
        self._shards: list[str] = list(state.get("shards", []))

    def state(self) -> dict:
        return {"weight_map": self.weight_map, "total_bytes": self.total_bytes, "shards": self._shards}

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-part-{len(self._shards):05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.out_dir / name), metadata={"format": "pt"})
        self._shards.append(name)
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total_bytes += v.numel() * v.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _replaceable(path: Path) -> bool:
    """--force replaces only what a previous run wrote (or an empty directory), never e.g. ~/models."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "compression_report.json").is_file())


def check_output_dir(dst: Path, force: bool, protect: Path | None = None) -> Path:
    """The resolved output path, if writing there is allowed: an existing `dst` is kept unless `force`
    (and then only a previous output); `protect` (the source) can never be the output or inside it."""
    dst = Path(dst).resolve()
    if protect is not None:
        src = Path(protect).resolve()
        if dst == src or src.is_relative_to(dst) or dst.is_relative_to(src):
            raise FileExistsError(f"output {dst} overlaps the source {src}: choose an --out outside it")
    if dst.exists():
        if not force:
            raise FileExistsError(f"output {dst} already exists: choose another --out or pass --force to replace it")
        if not _replaceable(dst):
            raise FileExistsError(f"--force replaces only an earlier `submoe compress` output or an empty directory, "
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


@contextmanager
def atomic_output_dir(dst: Path, force: bool, protect: Path | None = None):
    """Yield a temporary directory beside `dst`; rename it to `dst` only if the body succeeds.
    A failed run leaves no partial directory."""
    dst = check_output_dir(dst, force, protect)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        swap_into(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


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
                         protect: Path | None = None):
    """Like `atomic_output_dir`, but the work directory `.{name}.partial` beside `dst` survives a
    failed or killed run, and a later run with the same settings (`fingerprint`) gets its
    `Progress` back to continue from there. Different settings are refused unless `restart`."""
    dst = check_output_dir(dst, force, protect)
    partial = dst.parent / f".{dst.name}.partial"
    progress_file = partial / "progress.json"
    if partial.exists() and (restart or not progress_file.is_file()):
        shutil.rmtree(partial)
    progress = Progress(partial, fingerprint)
    if partial.exists():
        saved = json.loads(progress_file.read_text())
        if saved.pop("fingerprint") != fingerprint:
            raise FileExistsError(f"{partial} holds a partial run with other settings (model, method, counts, "
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


def copy_tokenizer(src: Path, dst: Path) -> None:
    copied = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied += 1
    if not copied:
        raise CheckpointError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): "
                              f"a servable checkpoint needs its tokenizer")
