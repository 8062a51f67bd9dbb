"""A checkpoint checked from its files alone, before anything is built: config.json, the `submoe`
block, and every safetensors header against the tensors the block needs.

`vllm serve` runs it in the API server while it builds its config (registered by the plugin), so a
bad checkpoint fails in seconds with one error naming file, layer and field, before any engine
process starts; `submoe check DIR` runs the same. The worker keeps its own checks on the weights
it loads as a second line of defence.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .checkpoint import (
    CheckpointFormatError,
    SubMoEBlock,
    check_all_present,
    check_tensor_shape,
    expected_expert_tensors,
    layout_for,
    parse_block,
)
from .profile import check_source, source_tensors

INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> Any:
    """A JSON file, or one error naming it: missing, unreadable and broken files alike."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path} is missing") from None
    except OSError as e:
        raise CheckpointFormatError(f"{path} cannot be read ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path} is not valid JSON ({e}): restore it from where the checkpoint "
                                    f"came from, or write the checkpoint again") from None


def read_config(model_dir: Path) -> dict:
    config = read_json(model_dir / "config.json")
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{model_dir / 'config.json'} holds a JSON {type(config).__name__}, "
                                    f"not an object: it is not a model config")
    return config


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open` (memory-mapped, lazy), or one error naming the file: a truncated or corrupt
    file fails here, when its header is read, not later inside a loader."""
    from safetensors import SafetensorError, safe_open
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointFormatError(f"{path} is not a readable safetensors file ({e}): it is truncated or "
                                    f"corrupt; copy it again or write the checkpoint again") from None
    with handle as h:
        yield h


def profile_sources(config: dict, block: SubMoEBlock, own: dict) -> dict[str, tuple[tuple[int, ...], Path, str]]:
    """Shape, source file and name there of every tensor a profile reads from its source (`own`: the
    profile's own tensors), once the source is checked to be as the profile was written against."""
    check_source(block.profile)
    read = source_tensors(config, block)
    both = sorted(set(read) & set(own))
    if both:
        raise CheckpointFormatError(f"tensor {both[0]} is both in the profile ({own[both[0]][1]}) and read from its "
                                    f"source ({read[both[0]].file}): write the profile again")
    return {name: (t.shape, t.file, t.name) for name, t in read.items()}


def tensor_shapes(model_dir: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every tensor's shape and file, from the safetensors headers alone (no tensor is read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if (model_dir / INDEX).is_file():
        index = read_json(model_dir / INDEX)
        listed = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else None
        if not listed:
            raise CheckpointFormatError(f"{model_dir / INDEX} has no `weight_map` of tensor -> file")
        absent = [f for f in listed if not (model_dir / f).is_file()]
        if absent:
            raise CheckpointFormatError(f"{model_dir / INDEX} lists {absent[0]}, which is missing from {model_dir}")
    if not files:
        raise CheckpointFormatError(f"{model_dir} has no *.safetensors weights")
    shapes = {}
    for f in files:
        with open_safetensors(f) as h:
            for name in h.keys():
                shapes[name] = (tuple(h.get_slice(name).get_shape()), f)
    return shapes


def check_checkpoint(model_dir: str | Path) -> SubMoEBlock:
    """Everything about a compressed checkpoint that its files decide; one error naming the first
    problem (file, layer, field or tensor)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointFormatError(f"{model_dir} is not a directory: pass the checkpoint directory "
                                    f"`submoe compress` wrote")
    config = read_config(model_dir)
    try:
        block = parse_block(config)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{model_dir}: {e}") from None
    expected = expected_expert_tensors(config, block)
    layout = layout_for(config)
    shapes = tensor_shapes(model_dir)
    if block.profile is not None:
        shapes.update({n: (shape, f) for n, (shape, f, _) in profile_sources(config, block, shapes).items()})
    for name, (shape, f) in shapes.items():
        try:
            check_tensor_shape(name, shape, expected, layout)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{f}: {e}") from None
    try:
        check_all_present(shapes, expected)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{model_dir}: {e}") from None
    return block


def main(argv: list[str] | None = None) -> int:
    """`submoe check DIR`: the checks `vllm serve` runs before it starts an engine."""
    import argparse
    ap = argparse.ArgumentParser(prog="submoe check", description=main.__doc__,
                                 epilog="example: submoe check tiny-4e   (a directory `submoe compress` wrote)")
    ap.add_argument("model", type=Path, help="a checkpoint directory written by `submoe compress`")
    args = ap.parse_args(argv)
    block = check_checkpoint(args.model)
    moe = [n for n in block.experts_per_layer if n]
    print(f"{args.model}: ok, format {block.raw['format_version']}, {block.method}: {len(moe)} MoE layers, "
          f"{block.num_router_experts} router experts -> {min(moe)}-{max(moe)} served experts per layer")
    return 0
