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
    rank: int | None = None
    rank_ratio: float | None = None
    seed: int = 0
    device: str = "cpu"
    force: bool = False
    output_tokens: int = 2048  # tokens on which every expert's output is measured (clustering)
    progress: bool = True


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
                       outputs=all_expert_outputs(tokens, experts).cpu(), router_logits=logits[sample].cpu())
    return stats, h + layer.mlp(moe_in)


@torch.no_grad()
def moe_output_error(tokens: torch.Tensor, router: torch.Tensor, experts: Experts, result, top_k: int) -> float:
    """‖merged MoE output − source MoE output‖ / ‖source‖ on calibration tokens (routing included)."""
    original = moe_forward(tokens, router, experts, top_k)
    emap = torch.tensor(result.expert_map, device=tokens.device)
    merged = moe_forward(tokens, router, result.experts.to(tokens.device), top_k, emap)
    return (torch.linalg.norm(merged - original) / torch.linalg.norm(original)).item()


def compress(opts: CompressOptions) -> dict:
    t0 = time.time()
    ckpt = LazyCheckpoint(opts.model)
    config = ckpt.config
    n_src, budgets = _check_options(opts, config)
    layout = layout_for(config)
    method = make_method(opts.method, rank=opts.rank, rank_ratio=opts.rank_ratio)
    if not ckpt.has_tokenizer():
        raise CompressError(f"{ckpt.dir} has no tokenizer.json / tokenizer_config.json: calibration text cannot "
                            f"be tokenized, and the output could not be served")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.dir))
    windows, calib_info = calibration_windows(tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed)
    cfg = hf_config(config)
    dev = torch.device(opts.device)
    top_k = config[layout.top_k_field]
    names = ckpt.names()
    src_dtype = ckpt.get("model.embed_tokens.weight").dtype

    with atomic_output_dir(opts.out, opts.force, protect=ckpt.dir) as tmp:
        writer = ShardWriter(tmp)
        globals_ = {n: ckpt.get(n) for n in names if not n.startswith("model.layers.")}
        x = globals_["model.embed_tokens.weight"].float()[windows].to(dev)
        writer.write(globals_)
        del globals_
        rotary = Rotary(cfg, opts.seq_len, device=dev)
        gen = torch.Generator().manual_seed(opts.seed)
        layers, maps = [], []
        for l in tqdm(range(cfg.num_hidden_layers), desc=f"compress {opts.method} {n_src}->{opts.num_experts}",
                      unit="layer", disable=not opts.progress):
            tl = time.time()
            tensors = {n: ckpt.get(n) for n in non_expert_names(names, l)}
            experts = read_experts(ckpt, l, n_src).to(dev, torch.float32)
            router = tensors[layout.router_tensor(l)].to(dev, torch.float32)
            layer = build_layer(cfg, l, tensors, experts).to(dev)
            sample = torch.randperm(len(windows) * opts.seq_len, generator=gen)[: opts.output_tokens].to(dev)
            stats, x = calibrate_layer(layer, x, rotary, router, experts, top_k, sample)
            result = method.reduce_layer(experts.to("cpu"), stats, budgets[l], opts.seed)
            err = moe_output_error(stats.tokens.to(dev), router, experts, result, top_k)
            writer.write({**tensors, **expert_tensors(l, result.experts.to(src_dtype))})
            maps.append(result.expert_map)
            layers.append(report_mod.layer_entry(l, stats, result, err, time.time() - tl))
            del layer, experts, tensors, stats, result
        writer.finish()

        out_config = dict(config)
        out_config[layout.num_experts_field] = max(max(m) + 1 for m in maps)
        out_config["architectures"] = [layout.plugin_architecture]
        source_bytes = ckpt.nbytes()
        out_config[BLOCK_KEY] = make_block(
            method=opts.method, num_router_experts=n_src, expert_maps=maps,
            source={"architecture": (config.get("architectures") or [layout.source_architecture])[0],
                    "num_experts": n_src, "weight_bytes": source_bytes, "path": str(opts.model)},
            weight_bytes=writer.total_bytes,
        )
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        copy_tokenizer(ckpt.dir, tmp)
        report = report_mod.build(opts, method, calib_info, layers, source_bytes, writer.total_bytes,
                                  n_src, time.time() - t0, peak_rss_bytes())
        report_mod.write(report, tmp)
    return report


__all__ = ["CompressError", "CompressOptions", "calibrate_layer", "compress"]
