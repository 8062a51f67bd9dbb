"""The output's config.json: the source's, with the served expert count and either the `submoe`
block (remap and profile exports, served by the plugin) or nothing more (vanilla export, a stock
checkpoint)."""
from __future__ import annotations

from submoe_format.checkpoint import BLOCK_KEY, make_block, merged_count

from ..source.architecture import SourceArchitecture


def output_config(config: dict, arch: SourceArchitecture, maps: list[list[int] | None], *, method: str, export: str,
                  source_path: str, source_bytes: int, weight_bytes: int, profile: dict | None = None,
                  source_experts: list | None = None, corrected: list[bool] = (),
                  constant_experts: list[list[int]] = ()) -> dict:
    layout, n_src = arch.layout, arch.num_experts
    out = dict(config)
    out.update(dict.fromkeys(layout.num_experts_keys(config), max(merged_count(m) for m in maps)))
    source_arch = (config.get("architectures") or [layout.source_architecture])[0]
    if export == "vanilla":  # a stock checkpoint: the N'-row router needs no map
        out["architectures"] = [source_arch]
        return out
    out["architectures"] = [layout.plugin_architecture]
    out[BLOCK_KEY] = make_block(
        method=method, num_router_experts=n_src, expert_maps=maps,
        source={"architecture": source_arch, "num_experts": n_src, "weight_bytes": source_bytes,
                "path": source_path},
        weight_bytes=weight_bytes, profile=profile, source_experts=source_experts or (), corrected=corrected,
        constant_experts=constant_experts,
    )
    return out
