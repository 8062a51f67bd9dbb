"""Writing a checkpoint: safetensors shards (one per call) with their index, and the tokenizer."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..source.checkpoint import TOKENIZER_FILES, CheckpointError

# safetensors serialises a whole shard in memory before writing it: this bounds that copy (one
# DeepSeek-V3 layer is 22.5 GB of experts, more than this machine's memory).
MAX_SHARD_BYTES = 2 << 30


class ShardWriter:
    """Writes tensors in shards (new ones on each call, at most `max_shard_bytes` each unless one
    tensor is larger) plus the safetensors index."""

    def __init__(self, out_dir: Path, state: dict | None = None, max_shard_bytes: int = MAX_SHARD_BYTES):
        """`state` (from `.state()`) continues an interrupted run's shards."""
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        state = state or {}
        self.weight_map: dict[str, str] = dict(state.get("weight_map", {}))
        self.total_bytes = state.get("total_bytes", 0)
        self._shards: list[str] = list(state.get("shards", []))

    @property
    def files(self) -> list[str]:
        return list(self._shards)

    def state(self) -> dict:
        return {"weight_map": self.weight_map, "total_bytes": self.total_bytes, "shards": self._shards}

    def write(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write `tensors` in order into new shards. (name, tensor) pairs are consumed one at a time,
        so a layer larger than memory can be generated as it is written."""
        pending, size, written = {}, 0, False
        for k, v in (tensors.items() if isinstance(tensors, Mapping) else tensors):
            nbytes = v.numel() * v.element_size()
            if pending and size + nbytes > self.max_shard_bytes:
                self._save(pending)
                pending, size, written = {}, 0, True
            pending[k], size = v, size + nbytes
        if pending or not written:
            self._save(pending)

    def _save(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-part-{len(self._shards):05d}.safetensors"
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.out_dir / name), metadata={"format": "pt"})
        self._shards.append(name)
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total_bytes += v.numel() * v.element_size()

    def finish(self) -> None:
        if not self.weight_map:  # no tensor (a pruning's profile): an empty index would hide the empty file
            return
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
