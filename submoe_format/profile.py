"""A profile: a compression served from its unchanged source checkpoint.

`submoe compress --export profile` writes config.json (with the `submoe` block), tokenizer, report
and model card, and only the tensors the compression changed: merged experts, none for a pruning.
Everything else is read from the source's own safetensors when the profile is loaded: attention,
norms, embeddings and the router as they are, and each kept expert straight into its served slot;
a dropped or merged-away source expert is never read. Trying ten ratios on a 480B model then writes
a few MB each instead of the model ten times.

The block says where the source is and what its files were when the profile was written, and,
per layer, which served experts are source experts unchanged (null: the profile stores it):

    "submoe": {"format_version": 3, ...,
               "profile": {"path": "/models/Mixtral-8x7B",
                           "files": {"model-00001-of-00019.safetensors": {"bytes": 4892622350,
                                                                          "header_sha256": "9f2c..."}}},
               "layers": [{"num_experts": 4, "expert_map": [...], "source_experts": [0, 3, null, 6]}, ...]}

A profile means something only beside the source it was computed from: a source that moved, lost a
file or changed one (its size or its safetensors header: names, dtypes, shapes, offsets) is refused,
naming the file. Pure: file headers and JSON, no torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .checkpoint import (
    BLOCK_KEY,
    CheckpointFormatError,
    SubMoEBlock,
    layout_for,
    parse_block,
    safetensors_bytes,
    safetensors_header_bytes,
)


def source_record(source_dir: str | Path) -> dict[str, Any]:
    """What a profile keeps of its source: its absolute path and, per safetensors file, its size and
    the digest of its header (a changed tensor changes the header's offsets or dtype; the data
    itself is not hashed, which would read the whole source)."""
    source_dir = Path(source_dir).resolve()
    files = {f.name: {"bytes": f.stat().st_size, "header_sha256": hashlib.sha256(safetensors_header_bytes(f)).hexdigest()}
             for f in sorted(source_dir.glob("*.safetensors"))}
    return {"path": str(source_dir), "files": files}


def check_source(profile: Mapping[str, Any]) -> Path:
    """The profile's source directory, if it is as the profile was written against; else one error
    naming the first file that is missing or changed, and the fix."""
    src = Path(profile["path"])
    fix = ("put the source checkpoint back as it was, or compress again with --export profile "
           "(or --export remap, which copies what it needs)")
    if not src.is_dir():
        raise CheckpointFormatError(f"the profile's source checkpoint {src} is missing: {fix}")
    for name, want in profile["files"].items():
        f = src / name
        if not f.is_file():
            raise CheckpointFormatError(f"the profile's source file {f} is missing: {fix}")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointFormatError(f"the profile's source file {f} changed since the profile was written "
                                        f"({f.stat().st_size} bytes, was {want['bytes']}): {fix}")
        if hashlib.sha256(safetensors_header_bytes(f)).hexdigest() != want["header_sha256"]:
            raise CheckpointFormatError(f"the profile's source file {f} changed since the profile was written "
                                        f"(its safetensors header differs): {fix}")
    return src


def _header(path: Path) -> dict[str, Any]:
    header = json.loads(safetensors_header_bytes(path))
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class SourceTensor:
    file: Path
    name: str  # in the source
    shape: tuple[int, ...]
    nbytes: int


def source_tensors(config: Mapping[str, Any], block: SubMoEBlock) -> dict[str, SourceTensor]:
    """Served tensor name -> where it lies in the source, for everything a profile reads from there:
    every tensor but the routed experts, and each kept expert renamed to its served slot."""
    layout, src = layout_for(config), Path(block.profile["path"])
    kept = {layout.expert_tensor(l, j, which): layout.expert_tensor(l, m, which)
            for l, slots in enumerate(block.source_experts) if slots
            for m, j in enumerate(slots) if j is not None for which in ("gate", "down", "up")}
    out = {}
    for name in block.profile["files"]:
        for tensor, meta in _header(src / name).items():
            served = kept.get(tensor, None if layout.is_expert_tensor(tensor) else tensor)
            if served is not None:
                out[served] = SourceTensor(src / name, tensor, tuple(meta["shape"]),
                                           meta["data_offsets"][1] - meta["data_offsets"][0])
    return out


def served_weight_bytes(model_dir: str | Path, config: Mapping[str, Any]) -> int | None:
    """Bytes of the weights a checkpoint serves: its safetensors, and a profile's source tensors too."""
    own = safetensors_bytes(model_dir)
    block = parse_block(config) if BLOCK_KEY in config else None
    if block is None or block.profile is None:
        return own
    return (own or 0) + sum(t.nbytes for t in source_tensors(config, block).values())
