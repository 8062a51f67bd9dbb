"""Reading a source checkpoint: lazy safetensors reads, one tensor at a time.

Reads go through `safe_open` (memory-mapped): a tensor is materialised only when asked for,
so a compressor holds one decoder layer at a time, whatever the model size.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from submoe_format.check import profile_sources, read_config, tensor_shapes
from submoe_format.checkpoint import BLOCK_KEY, parse_block
from submoe_format.errors import SubMoEError
from submoe_format.families import BY_MODEL_TYPE
from submoe_format.profile import served_weight_bytes

from .naming import Stored, canonical_sources

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


class CheckpointError(SubMoEError):
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
    """Name -> tensor access over one or many safetensors files, without loading them. Names are the
    family's own (offline.source.naming): a checkpoint stored with other expert names or fused experts
    reads as if written in them."""

    def __init__(self, model_dir: str | Path):
        self.dir = resolve_model_dir(str(model_dir))
        if not (self.dir / "config.json").is_file():
            raise CheckpointError(f"{self.dir} has no config.json: not a Hugging Face checkpoint directory")
        self.config = read_config(self.dir)
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir} has no *.safetensors weights (only safetensors are read; "
                                  f"convert .bin checkpoints first)")
        headers = tensor_shapes(self.dir)
        shapes = {name: shape for name, (shape, _) in headers.items()}
        family = BY_MODEL_TYPE.get(self.config.get("model_type"))  # an unsupported one is refused by its user
        stored = (canonical_sources(family, shapes, self.config.get("hidden_size")) if family
                  else {n: Stored(n) for n in shapes})
        self._where: dict[str, tuple[Path, Stored]] = {n: (headers[s.name][1], s) for n, s in stored.items()}
        block = parse_block(self.config) if BLOCK_KEY in self.config else None
        if block is not None and block.profile is not None:  # the rest is read from the profile's source
            self._where.update({n: (f, Stored(name)) for n, (_, f, name) in profile_sources(self.config, block,
                                                                                            headers).items()})
        self._handles: dict[Path, object] = {}

    def stored_as_named(self) -> bool:
        """Whether every tensor is stored whole under the family's own name (no other naming, no
        fused experts): what a profile needs of its source, whose tensors it names as they are."""
        return all(s.name == n and s.expert is None and s.rows is None for n, (_, s) in self._where.items())

    def has_tokenizer(self) -> bool:
        return any((self.dir / n).is_file() for n in TOKENIZER_FILES[:2])

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor: a view into the memory-mapped file (safetensors maps without copying),
        valid after `release()` but keeping the whole file mapped while it lives."""
        if name not in self._where:
            raise CheckpointError(f"{self.dir} is missing tensor {name}")
        f, stored = self._where[name]
        if f not in self._handles:  # its header was read in __init__: opening it again cannot fail on the header
            self._handles[f] = safe_open(str(f), framework="pt")
        return stored.select(self._handles[f].get_tensor(stored.name))

    def release(self) -> None:
        """Close the memory-mapped files: pages read so far stop counting as this process's memory
        (called after each layer, so resident memory does not grow with the model). A file stays
        mapped while a tensor from `get` lives: clone what must outlive the layer."""
        self._handles.clear()

    def nbytes(self) -> int:
        """Bytes of the weights it serves (a profile's, those it reads from its source included)."""
        return served_weight_bytes(self.dir, self.config)
