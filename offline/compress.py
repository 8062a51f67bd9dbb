"""`submoe compress`: stream a source MoE one decoder layer at a time and write a merged checkpoint.

Per layer: read its tensors (memory-mapped), run the calibration hidden states through it,
measure routing and expert outputs, group and merge the experts, write the layer's shard,
free it. Hidden states then move on through the *source* layer, so every layer is calibrated
on the activations the original model produces.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from vllm_submoe.checkpoint_format import BLOCK_KEY, layout_for, make_block

from . import report as report_mod
from .calibration import calibration_windows
from .checkpoint import LazyCheckpoint, ShardWriter, atomic_output_dir, copy_tokenizer
from .methods import LayerStats, make_method
from .mixtral_layer import Rotary, attention_half, build_layer, expert_tensors, hf_config, non_expert_names, \
    read_experts
from .moe_math import Experts, all_expert_outputs, moe_forward, routing_frequency


class CompressError(ValueError):
    """Compression settings that cannot work for this model."""


@dataclass
class CompressOptions:
    model: str
    out: Path
    method: str
    num_experts: int | list[int]  # one count for every layer, or one per layer (heterogeneous)
    calib: list[str] = field(default_factory=list)
    samples: int = 256
    seq_len: int = 256
    method_options: dict = field(default_factory=dict)  # e.g. rank, rank_ratio, adaptive, align_neurons
    seed: int = 0
    device: str = "cpu"
    force: bool = False
    output_tokens: int = 2048  # tokens on which every expert's output is measured (grouping, least squares)
    export: str = "remap"  # "remap": N router rows + maps (plugin); "vanilla": N'-row router, stock Mixtral
    progress: bool = True


@dataclass
class CalibratedLayer:
    """One source decoder layer as read, with what calibration measured on it."""

    index: int
    tensors: dict[str, torch.Tensor]  # non-expert tensors as stored
    experts: Experts  # float32
    router: torch.Tensor  # [N, H] float32
    stats: LayerStats


def _check_options(opts: CompressOptions, config: dict) -> tuple[int, list[int]]:
    """Source experts per layer and the per-layer target counts, or a clear error."""
    layout = layout_for(config)
    if BLOCK_KEY in config:
        raise CompressError(f"{opts.model} is already a compressed checkpoint (config.json has a `{BLOCK_KEY}` "
                            f"block): compress the source model instead")
    n, num_layers = config[layout.num_experts_field], config["num_hidden_layers"]
    counts = opts.num_experts if isinstance(opts.num_experts, list) else [opts.num_experts] * num_layers
    if len(counts) != num_layers:
        raise CompressError(f"--num-experts lists {len(counts)} counts but the model has {num_layers} layers: "
                            f"give one count, or one per layer")
    if not all(1 <= c < n for c in counts):
        raise CompressError(f"--num-experts must be between 1 and {n - 1} (the source has {n} experts per layer), "
                            f"got {opts.num_experts}")
    if opts.export not in ("remap", "vanilla"):
        raise CompressError(f"--export must be remap or vanilla, got {opts.export!r}")
    if opts.export == "vanilla" and len(set(counts)) != 1:
        raise CompressError("--export vanilla writes a stock Mixtral, whose layers all have the same expert "
                            "count: give one --num-experts, or use --export remap for per-layer counts")
    if opts.export == "vanilla" and counts[0] < config[layout.top_k_field]:
        raise CompressError(f"--export vanilla needs at least top_k={config[layout.top_k_field]} experts per layer, "
                            f"got {counts[0]}")
    if opts.output_tokens < 1:
        raise CompressError(f"--output-tokens must be at least 1, got {opts.output_tokens}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("--device cuda was given but no CUDA device is visible: use --device cpu")
    return n, counts


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def calibrate_layer(layer, x: torch.Tensor, rotary: Rotary, router: torch.Tensor, experts: Experts, top_k: int,
                    sample: torch.Tensor) -> tuple[LayerStats, torch.Tensor]:
    """Run calibration windows x [S, L, H] through one source layer: routing frequency over all
    tokens, every expert's output on the sampled tokens, and the layer's output (next layer's x)."""
    h = attention_half(layer, x, rotary)
    moe_in = layer.post_attention_layernorm(h)
    flat = moe_in.reshape(-1, moe_in.shape[-1])
    logits = flat @ router.T
    tokens = flat[sample]
    stats = LayerStats(frequency=routing_frequency(logits, top_k).cpu(), tokens=tokens.cpu(),
                       outputs=all_expert_outputs(tokens, experts).cpu(), router_logits=logits[sample].cpu(),
                       top_k=top_k, samples=len(x))
    for name, t in (("expert outputs", stats.outputs), ("MoE inputs", stats.tokens), ("router logits", logits)):
        if not torch.isfinite(t).all():
            raise CompressError(f"calibration produced NaN/inf {name} in layer {layer.self_attn.layer_idx}: the "
                                f"source weights are not finite there (check the checkpoint)")
    return stats, h + layer.mlp(moe_in)


def served_router(router: torch.Tensor, result, export: str) -> torch.Tensor:
    """The router the output serves: all N rows (remap), or each merged expert's representative row."""
    return router if export == "remap" else router[result.representatives]


@torch.no_grad()
def moe_output_error(tokens: torch.Tensor, router: torch.Tensor, experts: Experts, result, top_k: int,
                     export: str = "remap") -> float:
    """‖served MoE output − source MoE output‖ / ‖source‖ on calibration tokens (routing included)."""
    original = moe_forward(tokens, router, experts, top_k)
    emap = torch.tensor(result.expert_map, device=tokens.device) if export == "remap" else None
    served = moe_forward(tokens, served_router(router, result, export), result.experts.to(tokens.device), top_k, emap)
    return (torch.linalg.norm(served - original) / torch.linalg.norm(original)).item()


def calibrated_layers(ckpt: LazyCheckpoint, windows: torch.Tensor, opts: CompressOptions) -> Iterator[CalibratedLayer]:
    """Stream the source one decoder layer at a time: read it, run the calibration hidden states
    through it, yield it with its statistics. Hidden states move on through the *source* layer,
    so the statistics do not depend on the method (the quality benchmark reuses them)."""
    config = ckpt.config
    layout = layout_for(config)
    cfg, dev, names = hf_config(config), torch.device(opts.device), ckpt.names()
    x = ckpt.get("model.embed_tokens.weight").float()[windows].to(dev)
    rotary = Rotary(cfg, windows.shape[1], device=dev)
    gen = torch.Generator().manual_seed(opts.seed)
    for l in range(cfg.num_hidden_layers):
        tensors = {n: ckpt.get(n) for n in non_expert_names(names, l)}
        experts = read_experts(ckpt, l, config[layout.num_experts_field]).to(dev, torch.float32)
        router = tensors[layout.router_tensor(l)].to(dev, torch.float32)
        layer = build_layer(cfg, l, tensors, experts).to(dev)
        sample = torch.randperm(x.shape[0] * x.shape[1], generator=gen)[: opts.output_tokens].to(dev)
        stats, x = calibrate_layer(layer, x, rotary, router, experts, config[layout.top_k_field], sample)
        del layer
        yield CalibratedLayer(l, tensors, experts, router, stats)


def in_groups(layers: Iterable[CalibratedLayer], size: int) -> Iterator[list[CalibratedLayer]]:
    group: list[CalibratedLayer] = []
    for layer in layers:
        group.append(layer)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def compress(opts: CompressOptions, calibrated: Iterable[CalibratedLayer] | None = None,
             calib_info: dict | None = None) -> dict:
    """Compress `opts.model` into `opts.out`. `calibrated` (with `calib_info`) replays layers
    calibrated earlier with the same data and seed instead of streaming the source again."""
    t0 = time.time()
    ckpt = LazyCheckpoint(opts.model)
    config = ckpt.config
    n_src, budgets = _check_options(opts, config)
    layout = layout_for(config)
    method = make_method(opts.method, **opts.method_options)
    if calibrated is None:
        if not ckpt.has_tokenizer():
            raise CompressError(f"{ckpt.dir} has no tokenizer.json / tokenizer_config.json: calibration text "
                                f"cannot be tokenized, and the output could not be served")
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.dir))
        windows, calib_info = calibration_windows(tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed)
        calibrated = calibrated_layers(ckpt, windows, opts)
    dev = torch.device(opts.device)
    top_k = config[layout.top_k_field]
    src_dtype = ckpt.get("model.embed_tokens.weight").dtype

    with atomic_output_dir(opts.out, opts.force, protect=ckpt.dir) as tmp:
        writer = ShardWriter(tmp)
        writer.write({n: ckpt.get(n) for n in ckpt.names() if not n.startswith("model.layers.")})
        layers, maps = [], []
        bar = tqdm(total=config["num_hidden_layers"], desc=f"compress {opts.method} {n_src}->{opts.num_experts}",
                   unit="layer", disable=not opts.progress)
        for group in in_groups(calibrated, method.layers_per_group):
            tl = time.time()
            results = method.reduce_layers([(c.experts.to("cpu"), c.stats) for c in group],
                                           [budgets[c.index] for c in group], opts.seed)
            for c, result in zip(group, results):
                err = moe_output_error(c.stats.tokens.to(dev), c.router, c.experts, result, top_k, opts.export)
                tensors = dict(c.tensors)
                if opts.export == "vanilla":
                    router_name = layout.router_tensor(c.index)
                    tensors[router_name] = served_router(tensors[router_name], result, opts.export)
                writer.write({**tensors, **expert_tensors(c.index, result.experts.to(src_dtype))})
                maps.append(result.expert_map)
                layers.append(report_mod.layer_entry(c.index, c.stats, result, err, (time.time() - tl) / len(group)))
            bar.update(len(group))
            del group, results
        bar.close()
        writer.finish()

        source_bytes = ckpt.nbytes()
        out_config = output_config(opts, config, maps, n_src, source_bytes, writer.total_bytes)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        copy_tokenizer(ckpt.dir, tmp)
        report = report_mod.build(opts, method, calib_info, layers, source_bytes, writer.total_bytes,
                                  n_src, time.time() - t0, peak_rss_bytes())
        report_mod.write(report, tmp)
    return report


def output_config(opts: CompressOptions, config: dict, maps: list[list[int]], n_src: int, source_bytes: int,
                  weight_bytes: int) -> dict:
    layout = layout_for(config)
    out = dict(config)
    out[layout.num_experts_field] = max(max(m) + 1 for m in maps)
    source_arch = (config.get("architectures") or [layout.source_architecture])[0]
    if opts.export == "vanilla":  # a stock checkpoint: the N'-row router needs no map
        out["architectures"] = [source_arch]
        return out
    out["architectures"] = [layout.plugin_architecture]
    out[BLOCK_KEY] = make_block(
        method=opts.method, num_router_experts=n_src, expert_maps=maps,
        source={"architecture": source_arch, "num_experts": n_src, "weight_bytes": source_bytes,
                "path": str(opts.model)},
        weight_bytes=weight_bytes,
    )
    return out


__all__ = ["CalibratedLayer", "CompressError", "CompressOptions", "calibrate_layer", "calibrated_layers", "compress"]
