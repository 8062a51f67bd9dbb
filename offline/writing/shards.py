"""Writing a checkpoint: safetensors shards (one per call) with their index, and the tokenizer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..source.checkpoint import TOKENIZER_FILES, CheckpointError


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


def copy_tokenizer(src: Path, dst: Path) -> None:
    copied = 0
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied += 1
    if not copied:
        raise CheckpointError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): "
                              f"a servable checkpoint needs its tokenizer")
