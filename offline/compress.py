"""`submoe compress`: stream a source MoE one decoder layer at a time and write a merged checkpoint.

Per layer: read its tensors (memory-mapped), run the calibration hidden states through it,
measure routing and expert outputs, group and merge the experts, write the layer's shard,
free it. Hidden states then move on through the *source* layer, so every layer is calibrated
on the activations the original model produces.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import psutil
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from vllm_submoe.checkpoint_format import BLOCK_KEY, make_block, merged_count

from . import report as report_mod
from .activations import Activations
from .architecture import Rotary, SourceArchitecture, attention_half
from .calibration import calibration_windows
from .checkpoint import LazyCheckpoint, ShardWriter, copy_tokenizer, resumable_output_dir
from .methods import ExpertReducer, LayerStats, make_method
from .moe_math import Experts, Routing, all_expert_outputs, all_finite, moe_forward


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
    calib_batch: int = 16  # calibration windows through a layer at once: bounds the transient activations
    activation_memory: int = 1 << 30  # bytes of layer activations kept in RAM; more spill to a file
    restart: bool = False  # drop a partial earlier run of this --out instead of resuming it

    def fingerprint(self) -> dict:
        """What must match for a partial run to be resumed."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self).items()
                if k not in ("force", "progress", "restart", "device", "calib_batch", "activation_memory")}


@dataclass
class CalibratedLayer:
    """One source decoder layer as read, with what calibration measured on it (experts, router and
    stats are None for a layer without routed experts: it is written as it is)."""

    index: int
    tensors: dict[str, torch.Tensor]  # non-expert tensors as stored
    experts: Experts | None  # float32
    router: torch.Tensor | None  # [N, H] float32
    stats: LayerStats | None
    activations: Activations | None = None  # the calibration hidden states after this layer


def _check_options(opts: CompressOptions, config: dict, arch: SourceArchitecture) -> tuple[int, list[int | None]]:
    """Source experts per layer and the per-layer target counts (None: no routed experts), or a clear error."""
    if BLOCK_KEY in config:
        raise CompressError(f"{opts.model} is already a compressed checkpoint (config.json has a `{BLOCK_KEY}` "
                            f"block): compress the source model instead")
    n, moe = arch.num_experts, arch.moe_layers()
    if isinstance(opts.num_experts, list):
        given = list(opts.num_experts)
        if len(given) == sum(moe) != len(moe):  # one count per MoE layer: skip the dense ones
            given = [given.pop(0) if m else None for m in moe]
        if len(given) != len(moe):
            raise CompressError(f"--num-experts lists {len(given)} counts but the model has {len(moe)} layers "
                                f"({sum(moe)} with routed experts): give one count, or one per layer")
    else:
        given = [opts.num_experts] * len(moe)
    counts = [c if m else None for c, m in zip(given, moe)]
    if not all(1 <= c < n for c in counts if c is not None):
        raise CompressError(f"--num-experts must be between 1 and {n - 1} (the source has {n} experts per layer), "
                            f"got {opts.num_experts}")
    if opts.export not in ("remap", "vanilla"):
        raise CompressError(f"--export must be remap or vanilla, got {opts.export!r}")
    moe_counts = {c for c in counts if c is not None}
    if opts.export == "vanilla" and len(moe_counts) != 1:
        raise CompressError(f"--export vanilla writes a stock {arch.layout.source_architecture}, whose layers all have "
                            f"the same expert count: give one --num-experts, or use --export remap for per-layer counts")
    if opts.export == "vanilla" and min(moe_counts) < arch.routing.top_k:
        raise CompressError(f"--export vanilla needs at least top_k={arch.routing.top_k} experts per layer, "
                            f"got {min(moe_counts)}")
    if opts.export == "vanilla" and arch.routing.num_groups > 1:
        raise CompressError("--export vanilla cannot keep grouped top-k routing (n_group expert groups over fewer "
                            "router rows): use --export remap, which routes over the source's groups")
    if opts.output_tokens < 1:
        raise CompressError(f"--output-tokens must be at least 1, got {opts.output_tokens}")
    if opts.calib_batch < 1 or opts.activation_memory < 0:
        raise CompressError(f"--calib-batch must be at least 1 and --activation-memory at least 0, got "
                            f"{opts.calib_batch} and {opts.activation_memory}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise CompressError("--device cuda was given but no CUDA device is visible: use --device cpu")
    return n, counts


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@torch.no_grad()
def calibrate_batches(layer, source: Activations, target: Activations, rotary: Rotary, router: torch.Tensor | None,
                      experts: Experts | None, routing: Routing, sample: torch.Tensor, batch: int,
                      device: torch.device | str = "cpu") -> LayerStats | None:
    """Run the calibration windows through one source layer, `batch` windows at a time, from `source`
    into `target` (the next layer's input): routing frequency over all tokens, every expert's output
    on the sampled tokens (in `sample`'s order, whatever the batching). A layer without routed
    experts (router None) only moves the activations on."""
    windows, length, hidden = source.shape
    counts = torch.zeros(router.shape[0] if router is not None else 0, dtype=torch.float64)
    tokens = torch.empty(len(sample), hidden)
    logits_s = torch.empty(len(sample), counts.numel())
    sample = sample.cpu()
    for start in range(0, windows, batch):
        stop = min(start + batch, windows)
        h = attention_half(layer, source.read(start, stop).to(device), rotary)
        moe_in = layer.post_attention_layernorm(h)
        target.write(start, h + layer.mlp(moe_in))
        if router is None:
            continue
        flat = moe_in.reshape(-1, hidden)
        logits = flat @ router.T
        if not all_finite(logits):
            raise CompressError(f"calibration produced NaN/inf router logits in layer {layer.self_attn.layer_idx}: "
                                f"the source weights are not finite there (check the checkpoint)")
        _, ids = routing(logits)
        counts += torch.bincount(ids.flatten().cpu(), minlength=counts.numel()).double()
        here = torch.nonzero((sample >= start * length) & (sample < stop * length)).flatten()
        rows = (sample[here] - start * length).to(flat.device)
        tokens[here], logits_s[here] = flat[rows].cpu(), logits[rows].cpu()
    if router is None:
        return None
    stats = LayerStats(frequency=counts / counts.sum(), tokens=tokens,
                       outputs=all_expert_outputs(tokens.to(device), experts).cpu(), router_logits=logits_s,
                       samples=windows, routing=routing)
    for name, t in (("expert outputs", stats.outputs), ("MoE inputs", stats.tokens)):
        if not all_finite(t):
            raise CompressError(f"calibration produced NaN/inf {name} in layer {layer.self_attn.layer_idx}: the "
                                f"source weights are not finite there (check the checkpoint)")
    return stats


def calibrate_layer(layer, x: torch.Tensor, rotary: Rotary, router: torch.Tensor | None, experts: Experts | None,
                    routing: Routing, sample: torch.Tensor) -> tuple[LayerStats | None, torch.Tensor]:
    """`calibrate_batches` on in-memory windows x [S, L, H], all at once: (stats, the layer's output)."""
    out = Activations(tuple(x.shape))
    stats = calibrate_batches(layer, Activations(tuple(x.shape), tensor=x.float()), out, rotary, router, experts,
                              routing, sample, batch=len(x), device=x.device)
    return stats, out.tensor


def served_router(router: torch.Tensor, result, export: str) -> torch.Tensor:
    """The router the output serves: all N rows (remap), or each merged expert's representative row."""
    return router if export == "remap" else router[result.representatives]


@torch.no_grad()
def moe_output_error(tokens: torch.Tensor, router: torch.Tensor, experts: Experts, result, routing: Routing | int,
                     export: str = "remap") -> float:
    """‖served routed-expert output − source's‖ / ‖source's‖ on calibration tokens (routing included;
    shared experts are kept as they are, so they add the same to both)."""
    original = moe_forward(tokens, router, experts, routing)
    emap = torch.tensor(result.expert_map, device=tokens.device) if export == "remap" else None
    served = moe_forward(tokens, served_router(router, result, export), result.experts.to(tokens.device), routing, emap)
    return (torch.linalg.norm(served - original) / torch.linalg.norm(original)).item()


def calibrated_layers(ckpt: LazyCheckpoint, windows: torch.Tensor, opts: CompressOptions, workdir: Path | None = None,
                      start: int = 0, resume: Activations | None = None) -> Iterator[CalibratedLayer]:
    """Stream the source one decoder layer at a time: read it, run the calibration hidden states
    through it (`opts.calib_batch` windows at a time; activations over `opts.activation_memory`
    spill to files in `workdir`), yield it with its statistics. Hidden states move on through the
    *source* layer, so the statistics do not depend on the method (the quality benchmark reuses
    them). `start` > 0 continues a run from `resume`, the activations after layer start-1."""
    arch = SourceArchitecture.of(ckpt.config)
    dev, names = torch.device(opts.device), ckpt.names()
    shape = (*windows.shape, arch.config.hidden_size)
    store = lambda name: (Activations.create(shape, workdir, name, opts.activation_memory)  # noqa: E731
                          if workdir is not None else Activations(shape))
    x = resume
    if x is None:
        x, embed = store("x-0.f32"), ckpt.get("model.embed_tokens.weight")
        for a in range(0, len(windows), opts.calib_batch):
            x.write(a, embed[windows[a:a + opts.calib_batch]])
        del embed
    rotary = arch.rotary(windows.shape[1], device=dev)
    gen = torch.Generator().manual_seed(opts.seed)
    for l, is_moe in enumerate(arch.moe_layers()):
        sample = torch.randperm(windows.numel(), generator=gen)[: opts.output_tokens]  # drawn for every layer
        if l < start:
            continue
        tensors = {n: ckpt.get(n).clone() for n in arch.non_expert_names(names, l)}  # owned: see release()
        experts = arch.read_experts(ckpt, l, arch.num_experts, torch.float32, dev) if is_moe else None
        router = tensors[arch.layout.router_tensor(l)].to(dev, torch.float32) if is_moe else None
        ckpt.release()
        layer = arch.build_layer(l, tensors, experts).to(dev)  # only this layer is on the device
        out = store(f"x-{(l + 1) % 2}.f32")
        stats = calibrate_batches(layer, x, out, rotary, router, experts, arch.routing, sample, opts.calib_batch, dev)
        del layer
        x = out
        yield CalibratedLayer(l, tensors, experts, router, stats, activations=x)
        del tensors, experts, router, stats  # the consumer holds the layer now; the next one must not overlap it


def in_groups(layers: Iterable[CalibratedLayer], size: int) -> Iterator[list[CalibratedLayer]]:
    """Consecutive MoE layers `size` at a time; a layer without routed experts comes alone."""
    group: list[CalibratedLayer] = []
    for layer in layers:
        if layer.experts is None:
            if group:
                yield group
            group = [layer]
        else:
            group.append(layer)
        del layer  # the consumer frees a group it is done with: nothing here may keep it alive
        if len(group) == size or group[0].experts is None:
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
    arch = SourceArchitecture.of(config)
    n_src, budgets = _check_options(opts, config, arch)
    method = make_method(opts.method, **opts.method_options)
    if calibrated is None:
        if not ckpt.has_tokenizer():
            raise CompressError(f"{ckpt.dir} has no tokenizer.json / tokenizer_config.json: calibration text "
                                f"cannot be tokenized, and the output could not be served")
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.dir))
        windows, calib_info = calibration_windows(tokenizer, opts.calib, opts.samples, opts.seq_len, opts.seed)
    rss_before_weights = rss_bytes()  # the floor no layer adds to: libraries, tokenizer, calibration tokens
    dev = torch.device(opts.device)
    src_dtype = ckpt.get("model.embed_tokens.weight").dtype
    replay = calibrated is not None

    with resumable_output_dir(opts.out, opts.force, opts.fingerprint(), opts.restart or replay,
                              protect=ckpt.dir) as progress:
        tmp, state = progress.dir, progress.state
        done = state.get("layers_done", 0)
        writer = ShardWriter(tmp, state.get("writer"))
        layers, maps = state.get("report_layers", []), state.get("maps", [])
        if not replay:
            resume = Activations((*windows.shape, config["hidden_size"]), path=tmp / "resume.f32") if done else None
            calibrated = calibrated_layers(ckpt, windows, opts, tmp, start=done, resume=resume)
        if not done:
            writer.write({n: ckpt.get(n) for n in ckpt.names() if not n.startswith("model.layers.")})
        bar = tqdm(total=config["num_hidden_layers"], initial=done, unit="layer", disable=not opts.progress,
                   desc=f"compress {opts.method} {n_src}->{opts.num_experts}")
        if done:
            bar.write(f"resuming {opts.out} after its first {done} finished layers", file=sys.stderr)
        for group in in_groups(calibrated, method.layers_per_group):
            for entry in reduce_and_write(group, method, budgets, arch, writer, opts, src_dtype):
                maps.append(entry["expert_map"] if entry else None)
                if entry:
                    layers.append(entry)
            if not replay:  # a kill from here on resumes after this group
                group[-1].activations.save_as(tmp / "resume.f32")
                progress.save(layers_done=group[-1].index + 1, writer=writer.state(), maps=maps,
                              report_layers=layers, seconds=state.get("seconds", 0) + time.time() - t0)
            bar.update(len(group))
            del group
        bar.close()
        writer.finish()
        for f in tmp.glob("*.f32"):
            f.unlink()

        source_bytes = ckpt.nbytes()
        out_config = output_config(opts, config, arch, maps, n_src, source_bytes, writer.total_bytes)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        copy_tokenizer(ckpt.dir, tmp)
        report = report_mod.build(opts, method, calib_info, layers, [merged_count(m) for m in maps], source_bytes,
                                  writer.total_bytes, n_src, state.get("seconds", 0) + time.time() - t0,
                                  peak_rss_bytes(), rss_before_weights)
        report_mod.write(report, tmp)
    return report


def reduce_and_write(group: list[CalibratedLayer], method: ExpertReducer, budgets: list[int | None], arch: SourceArchitecture,
                     writer: ShardWriter, opts: CompressOptions, dtype: torch.dtype) -> list[dict | None]:
    """Merge one group of calibrated layers and write each as a shard: per layer its report entry,
    expert map included (None for a layer without routed experts, written as it is). Everything
    this holds is freed on return, before the next layer is read."""
    if group[0].experts is None:
        writer.write(group[0].tensors)
        return [None]
    t0, dev = time.time(), torch.device(opts.device)
    results = method.reduce_layers([(c.experts.to("cpu"), c.stats) for c in group],
                                   [budgets[c.index] for c in group], opts.seed)
    entries = []
    for c, result in zip(group, results):
        err = moe_output_error(c.stats.tokens.to(dev), c.router, c.experts, result, arch.routing, opts.export)
        tensors = dict(c.tensors)
        if opts.export == "vanilla":
            router_name = arch.layout.router_tensor(c.index)
            tensors[router_name] = served_router(tensors[router_name], result, opts.export)
        writer.write({**tensors, **arch.expert_tensors(c.index, result.experts.to(dtype))})
        entries.append(report_mod.layer_entry(c.index, c.stats, result, err, (time.time() - t0) / len(group)))
    return entries


def output_config(opts: CompressOptions, config: dict, arch: SourceArchitecture, maps: list[list[int] | None],
                  n_src: int, source_bytes: int, weight_bytes: int) -> dict:
    layout = arch.layout
    out = dict(config)
    out[layout.num_experts_key(config)] = max(merged_count(m) for m in maps)
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
