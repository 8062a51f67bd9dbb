"""The checkpoint format: the `submoe` block in config.json and the expert tensors' names.

The compressor writes it, the plugin and the load tester read it, so it imports none of them,
nor vLLM, nor torch.

    "submoe": {"format_version": 1, "method": "submoe",
               "source": {"architecture": "MixtralForCausalLM", "num_experts": 8, ...},
               "num_router_experts": 8,
               "layers": [{"num_experts": 4, "expert_map": [0, 0, 1, 2, 3, 1, 2, 3]}, ...]}

`expert_map[l][i]` is the merged expert that serves router expert i in layer l. A layer without
routed experts (DeepSeek's first dense layers, Qwen-MoE's `mlp_only_layers`) has `null`.

Version 2 adds dropped router experts: `expert_map[l][i] = null` removes router expert i's logit
before the top-k, exactly as a pruned N'-row router would (REAP and frequency pruning as
published). A layer keeps at least top_k live router experts. Writers use version 1 when nothing
is dropped, so older readers keep reading what they can serve; readers accept both.

Version 3 adds profiles (submoe_format.profile): a `profile` entry naming the source checkpoint whose
unchanged tensors the checkpoint reads, and per layer `source_experts[m]`, the source expert that
served expert m is (null: stored in the checkpoint). Only profiles are written as version 3.

Version 4 adds correction vectors. A layer with `"correction": true` holds the tensor
`submoe.layers.{l}.correction` [num_router_experts, hidden]: each token's routed output gains
sum_k w_k * correction[i_k] over its top-k router experts i_k with routing weights w_k (scaled as
the routed output is). Its `constant_experts` (MoNE's novices) are router experts routed as usual
that serve their correction row alone: null in `expert_map`, but not dropped. Only layers with a
correction are written as version 4.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import SubMoEError
from .families import BY_MODEL_TYPE, MIXTRAL, Family

FORMAT_VERSION = 4  # the newest this code reads and writes
READABLE_VERSIONS = (1, 2, 3, 4)  # 2 adds dropped router experts (null in expert_map), 3 profiles, 4 corrections
BLOCK_KEY = "submoe"
PROFILE_KEY = "profile"


class CheckpointFormatError(SubMoEError):
    """A `submoe` block or expert tensor that does not follow the format."""


def supported_architectures() -> str:
    return ", ".join(f"{l.source_architecture} ({l.model_type})" for l in BY_MODEL_TYPE.values())


def layout_for(config: Mapping[str, Any]) -> Family:
    """The family (config fields, tensor names, routing) of a config.json, by its model_type."""
    model_type = config.get("model_type")
    if model_type not in BY_MODEL_TYPE:
        raise CheckpointFormatError(
            f"unsupported architecture model_type={model_type!r} (architectures={config.get('architectures')}); "
            f"vllm-submoe supports {supported_architectures()}")
    return BY_MODEL_TYPE[model_type]


@dataclass(frozen=True)
class SubMoEBlock:
    """A validated `submoe` block."""

    method: str
    num_router_experts: int
    expert_maps: tuple[tuple[int, ...] | None, ...]  # None: a layer without routed experts
    raw: Mapping[str, Any]
    profile: Mapping[str, Any] | None = None  # a profile's source (path, files); None: all tensors are here
    source_experts: tuple[tuple[int | None, ...] | None, ...] = ()  # a profile's per-layer served <- source expert
    corrected: tuple[bool, ...] = ()  # per layer: holds a correction tensor (version 4); () when none does
    constant_experts: tuple[tuple[int, ...], ...] = ()  # per layer: router experts served by their correction alone

    @property
    def experts_per_layer(self) -> tuple[int, ...]:
        return tuple(merged_count(m) for m in self.expert_maps)

    def is_corrected(self, layer: int) -> bool:
        return bool(self.corrected) and self.corrected[layer]

    def constants(self, layer: int) -> tuple[int, ...]:
        return self.constant_experts[layer] if self.constant_experts else ()


def correction_tensor(layer: int) -> str:
    """A corrected layer's [num_router_experts, hidden] correction vectors (outside `model.`: no
    architecture's own loader knows it)."""
    return f"submoe.layers.{layer}.correction"


def merged_count(expert_map: Iterable[int | None] | None) -> int:
    """Experts a layer serves under its map (0 for a layer without routed experts)."""
    return 0 if expert_map is None else max(e for e in expert_map if e is not None) + 1


def dropped_experts(expert_map: Iterable[int | None] | None, constant: Iterable[int] = ()) -> list[int]:
    """Router experts a layer drops (null in its map, not a constant expert): their logits leave the top-k."""
    constant = set(constant)
    return [] if expert_map is None else [i for i, e in enumerate(expert_map) if e is None and i not in constant]


def make_block(method: str, source: Mapping[str, Any], num_router_experts: int,
               expert_maps: Iterable[Iterable[int]], profile: Mapping[str, Any] | None = None,
               source_experts: Iterable[Iterable[int | None] | None] = (), corrected: Iterable[bool] = (),
               constant_experts: Iterable[Iterable[int]] = (), **extra: Any) -> dict[str, Any]:
    """The `submoe` block; with `profile` (submoe_format.profile.source_record) and `source_experts`
    (per layer, the source expert each served expert is, or None), a profile's; with `corrected`
    (per layer) and `constant_experts` (per layer), correction vectors."""
    maps = [None if m is None else [None if i is None else int(i) for i in m] for m in expert_maps]
    layers = [None if m is None else {"num_experts": merged_count(m), "expert_map": m} for m in maps]
    if profile is not None:
        for layer, kept in zip(layers, source_experts):
            if layer is not None:
                layer["source_experts"] = list(kept)
    for layer, corr, const in itertools.zip_longest(layers, corrected, constant_experts):
        if layer is not None and corr:
            layer["correction"] = True
            layer["constant_experts"] = sorted(int(i) for i in const or ())
    version = 4 if any(corrected) else 3 if profile is not None else \
        2 if any(None in (m or ()) for m in maps) else 1
    return {
        # the oldest version that can say it, so older readers keep reading what they can serve
        "format_version": version,
        "method": method,
        "source": dict(source),
        "num_router_experts": int(num_router_experts),
        "layers": layers,
        **({PROFILE_KEY: dict(profile)} if profile is not None else {}),
        **extra,
    }


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_block(config: Mapping[str, Any]) -> SubMoEBlock:
    """Validate the `submoe` block of a config dict; one error naming layer and field."""
    block = config.get(BLOCK_KEY)
    where = f"config.json `{BLOCK_KEY}`"
    if not isinstance(block, Mapping):
        raise CheckpointFormatError(
            f"{where} block is missing: this checkpoint was not written by `submoe compress` "
            f"(serve it with its source architecture instead)")
    version = block.get("format_version")
    if version not in READABLE_VERSIONS or not _int(version):
        raise CheckpointFormatError(
            f"{where}.format_version is {version!r}; this vllm-submoe reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade vllm-submoe or re-export the checkpoint")
    n_router = block.get("num_router_experts")
    if not _int(n_router) or n_router < 1:
        raise CheckpointFormatError(f"{where}.num_router_experts must be a positive integer, got {n_router!r}")
    layers = block.get("layers")
    num_layers = config.get("num_hidden_layers")
    if not isinstance(layers, list) or len(layers) != num_layers or not layers:
        got = len(layers) if isinstance(layers, list) else repr(layers)
        raise CheckpointFormatError(f"{where}.layers must list one entry per decoder layer "
                                    f"(num_hidden_layers={num_layers}), got {got}")
    layout = layout_for(config)
    profile = _profile(block, where, version)
    maps, kept, corrected, constants = [], [], [], []
    for l, (layer, is_moe) in enumerate(zip(layers, layout.moe_layers(config))):
        lw = f"{where}.layers[{l}]"
        if layer is None and not is_moe:
            maps.append(None)
            kept.append(None)
            corrected.append(False)
            constants.append(())
            continue
        if (layer is None) != (not is_moe):
            what = "is null but the architecture routes experts there" if is_moe else \
                "has an expert map but the architecture has a dense MLP there"
            raise CheckpointFormatError(f"{lw} {what} (see {layout.model_type}'s config): the block does not "
                                        f"belong to this config")
        maps.append(_layer_map(layer, lw, n_router, version))
        kept.append(_source_experts(layer, lw, maps[-1]) if profile else None)
        corrected.append(_corrected(layer, lw, version))
        constants.append(_constant_experts(layer, lw, maps[-1], corrected[-1]))
    counts = {key: config[key] for key in layout.num_experts_keys(config) if key in config}
    if len(set(map(repr, counts.values()))) > 1:
        raise CheckpointFormatError(
            f"config.json gives the expert count twice, {' and '.join(f'`{k}` = {v!r}' for k, v in counts.items())}: "
            f"transformers reads only one of them, so they must agree (set both to {max(merged_count(m) for m in maps)})")
    declared, largest = layout.num_experts(config), max(merged_count(m) for m in maps)
    if declared != largest:
        raise CheckpointFormatError(
            f"config.json `{layout.num_experts_key(config)}` is {declared!r} but the largest per-layer "
            f"expert count in `{BLOCK_KEY}.layers` is {largest}: they must agree")
    top_k = config.get(layout.top_k_field)
    if not _int(top_k) or not 1 <= top_k <= n_router:
        raise CheckpointFormatError(f"config.json `{layout.top_k_field}` must be an integer in 1..{n_router} "
                                    f"(num_router_experts), got {top_k!r}")
    _check_drops(maps, constants, config, layout, top_k, where)
    return SubMoEBlock(method=str(block.get("method", "unknown")), num_router_experts=n_router,
                       expert_maps=tuple(maps), raw=block, profile=profile,
                       source_experts=tuple(kept) if profile else (),
                       corrected=tuple(corrected) if any(corrected) else (),
                       constant_experts=tuple(constants) if any(corrected) else ())


def _corrected(layer: Mapping[str, Any], lw: str, version: int) -> bool:
    corrected = layer.get("correction", False)
    if not isinstance(corrected, bool):
        raise CheckpointFormatError(f"{lw}.correction must be true or false, got {corrected!r}")
    if corrected and version < 4:
        raise CheckpointFormatError(f"{lw}.correction needs format_version 4, the block says {version}")
    return corrected


def _constant_experts(layer: Mapping[str, Any], lw: str, expert_map: tuple[int | None, ...],
                      corrected: bool) -> tuple[int, ...]:
    """A corrected layer's router experts served by their correction row alone (null in its map)."""
    constant = layer.get("constant_experts", [])
    if constant and not corrected:
        raise CheckpointFormatError(f"{lw}.constant_experts are served by their correction row, but the layer "
                                    f"has no correction (set `correction: true` and write its tensor)")
    if not isinstance(constant, list) or not all(_int(i) and 0 <= i < len(expert_map) for i in constant) \
            or len(set(constant)) != len(constant):
        raise CheckpointFormatError(f"{lw}.constant_experts must list distinct router experts in "
                                    f"0..{len(expert_map) - 1}, got {constant!r}")
    served = [i for i in constant if expert_map[i] is not None]
    if served:
        raise CheckpointFormatError(f"{lw}.constant_experts {served} also serve merged experts in expert_map: a "
                                    f"constant expert's map entry is null")
    return tuple(constant)


def _profile(block: Mapping[str, Any], where: str, version: int) -> Mapping[str, Any] | None:
    """The validated `profile` entry (None: the checkpoint holds all its tensors)."""
    profile = block.get(PROFILE_KEY)
    if profile is None:
        return None
    if version < 3:
        raise CheckpointFormatError(f"{where}.{PROFILE_KEY} needs format_version 3, the block says {version}")
    files = profile.get("files") if isinstance(profile, Mapping) else None
    if not isinstance(profile, Mapping) or not isinstance(profile.get("path"), str) or not isinstance(files, Mapping) \
            or not files or not all(isinstance(v, Mapping) and _int(v.get("bytes")) and isinstance(v.get("header_sha256"), str)
                                    for v in files.values()):
        raise CheckpointFormatError(f"{where}.{PROFILE_KEY} must give the source `path` and its `files` "
                                    f"(name -> bytes, header_sha256): write the profile again")
    return profile


def _source_experts(layer: Mapping[str, Any], lw: str, expert_map: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """A profile layer's served expert -> the source expert it is unchanged (None: stored in the profile).
    A kept source expert must be one its served expert serves, as a pruning or a singleton group keeps it."""
    kept = layer.get("source_experts")
    n = merged_count(expert_map)
    if not isinstance(kept, list) or len(kept) != n:
        raise CheckpointFormatError(f"{lw}.source_experts must list one entry per served expert ({n}) in a profile")
    for m, j in enumerate(kept):
        if j is not None and not (_int(j) and 0 <= j < len(expert_map) and expert_map[j] == m):
            raise CheckpointFormatError(f"{lw}.source_experts[{m}] = {j!r} is not a router expert that served expert "
                                        f"{m} serves (expert_map): write the profile again")
    return tuple(kept)


def _layer_map(layer: Any, lw: str, n_router: int, version: int) -> tuple[int | None, ...]:
    """One layer's validated map; version 2 allows null (a dropped router expert)."""
    n = layer.get("num_experts") if isinstance(layer, Mapping) else None
    m = layer.get("expert_map") if isinstance(layer, Mapping) else None
    if not _int(n) or not 1 <= n <= n_router:
        raise CheckpointFormatError(f"{lw}.num_experts must be an integer in 1..{n_router}, got {n!r}")
    if not isinstance(m, list) or len(m) != n_router:
        got = len(m) if isinstance(m, list) else repr(m)
        raise CheckpointFormatError(f"{lw}.expert_map must have one entry per router expert ({n_router}), got {got}")
    for i, e in enumerate(m):
        if e is None and version >= 2:
            continue
        if e is None:
            raise CheckpointFormatError(f"{lw}.expert_map[{i}] is null (a dropped router expert), which format "
                                        f"version {version} cannot say: set format_version to 2")
        if not _int(e):
            raise CheckpointFormatError(f"{lw}.expert_map[{i}] = {e!r} is not an integer: ids are merged-expert "
                                        f"indices 0..{n - 1}" + (", or null for a dropped router expert" if version >= 2
                                                                 else ""))
        if not 0 <= e < n:
            raise CheckpointFormatError(f"{lw}.expert_map[{i}] = {e!r} is outside 0..{n - 1} "
                                        f"(num_experts={n}): the map would index a missing expert")
    unreached = sorted(set(range(n)) - set(m))
    if unreached:
        raise CheckpointFormatError(f"{lw}.expert_map reaches no router expert to merged expert(s) "
                                    f"{unreached}: drop them or fix the map")
    return tuple(m)


def _check_drops(maps: list, constants: list, config: Mapping[str, Any], layout: Family, top_k: int,
                 where: str) -> None:
    """A layer keeps at least top_k live router experts; drops need plain (not grouped) top-k."""
    for l, (m, constant) in enumerate(zip(maps, constants)):
        dropped = dropped_experts(m, constant)
        if not dropped:
            continue
        live = len(m) - len(dropped)
        if live < top_k:
            raise CheckpointFormatError(f"{where}.layers[{l}] drops {len(dropped)} of {len(m)} router experts, "
                                        f"leaving {live}, fewer than the {top_k} each token routes to "
                                        f"(`{layout.top_k_field}`): keep at least {top_k}")
        if layout.routing.settings(config.get)["num_groups"] > 1:
            raise CheckpointFormatError(f"{where}.layers[{l}] drops router experts, but {layout.model_type} routes "
                                        f"with grouped top-k, whose expert groups a drop would unbalance: "
                                        f"substitute pruned experts instead (submoe compress --substitute-pruned)")


def served_expert_maps(config: Mapping[str, Any]) -> list[list[int | None] | None]:
    """Per-layer router expert -> served expert (None: dropped): the validated maps of a compressed
    checkpoint, the identity for a source model; None for a layer without routed experts."""
    if BLOCK_KEY in config:
        return [None if m is None else list(m) for m in parse_block(config).expert_maps]
    layout = layout_for(config)
    n = layout.num_experts(config)
    return [list(range(n)) if moe else None for moe in layout.moe_layers(config)]


def expected_expert_tensors(config: Mapping[str, Any], block: SubMoEBlock) -> dict[str, tuple[int, int]]:
    """Every expert and router tensor a checkpoint must hold, with its shape."""
    layout = layout_for(config)
    hidden, inter = config["hidden_size"], config[layout.intermediate_field]
    shapes = layout.expert_shapes(hidden, inter)
    out = {}
    for l, n in enumerate(block.experts_per_layer):
        if block.expert_maps[l] is None:
            continue
        out[layout.router_tensor(l)] = (block.num_router_experts, hidden)
        if block.is_corrected(l):
            out[correction_tensor(l)] = (block.num_router_experts, hidden)
        for j in range(n):
            for which, shape in shapes.items():
                out[layout.expert_tensor(l, j, which)] = shape
    return out


def check_tensor_shape(name: str, shape: Iterable[int], expected: Mapping[str, tuple[int, int]],
                       layout: Family = MIXTRAL) -> None:
    """A known expert/router tensor must have its shape; an expert tensor the block does not
    expect (an id past the layer's count, another naming) is an error, not silently dropped."""
    want = expected.get(name)
    if want is None:
        if layout.is_expert_tensor(name):
            raise CheckpointFormatError(f"unexpected expert tensor {name}: the `{BLOCK_KEY}` block gives that layer "
                                        f"fewer experts, or the name is not {'/'.join(layout.expert_names)}")
        return
    if tuple(shape) != want:
        raise CheckpointFormatError(f"tensor {name} has shape {tuple(shape)}, expected {want} "
                                    f"from config.json and the `{BLOCK_KEY}` block")


def check_all_present(seen: Iterable[str], expected: Mapping[str, Any]) -> None:
    missing = sorted(set(expected) - set(seen))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointFormatError(f"checkpoint is missing tensor(s) {', '.join(missing[:3])}{more}")


def safetensors_header_bytes(path: Path) -> bytes:
    """A safetensors file's JSON header, as stored (tensor names, dtypes, shapes, offsets)."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = fh.read(size)
    if len(header) != size:
        raise CheckpointFormatError(f"{path} is not a readable safetensors file (its header is cut short)")
    return header


def safetensors_bytes(model_dir: str | Path) -> int | None:
    """Bytes of all tensors in a local checkpoint, from the safetensors headers alone."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        header = json.loads(safetensors_header_bytes(f))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total
