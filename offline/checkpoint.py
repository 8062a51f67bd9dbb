"""Checkpoint I/O at the edges: lazy safetensors reads of a source, atomic writes of a result.

Reads go through `safe_open` (memory-mapped): a tensor is materialised only when asked for,
so a compressor holds one decoder layer at a time, whatever the model size.
"""
from __future__ import annotations

import json
import os
import shutil
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
        if name not in self._file_of:
            raise CheckpointError(f"{self.dir} is missing tensor {name}")
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        return self._handles[f].get_tensor(name)

    def nbytes(self) -> int:
        return safetensors_bytes(self.dir)


class ShardWriter:
    """Writes tensors shard by shard (one shard per call) plus the safetensors index."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._shards: list[str] = []

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


@contextmanager
def atomic_output_dir(dst: Path, force: bool, protect: Path | None = None):
    """Yield a temporary directory beside `dst`; rename it to `dst` only if the body succeeds.

    An existing `dst` is kept unless `force` (and then only a previous output); a failed run
    leaves no partial directory; `protect` (the source) can never be the output or inside it.
    """
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():  # --force: move the old directory aside, swap in the new one, then drop the old
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.rename(dst, old / dst.name)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(old / dst.name, dst)  # put the user's directory back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def copy_tokenizer(src: Path, dst: Path) -> None:
    copied = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied += 1
    if not copied:
        raise CheckpointError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): "
                              f"a servable checkpoint needs its tokenizer")
