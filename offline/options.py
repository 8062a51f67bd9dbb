"""What `submoe compress` was asked to do, and whether it can be done on this source with this
method, checked before anything is read or written."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from submoe_format.checkpoint import BLOCK_KEY
from submoe_format.errors import SubMoEError

from .calibration.settings import Calibration
from .methods import Method
from .source.architecture import SourceArchitecture
from .source.checkpoint import LazyCheckpoint


class CompressError(SubMoEError):
    """Compression settings that cannot work for this model."""


@dataclass(kw_only=True)
class CompressOptions(Calibration):
    """`submoe compress`: the calibration settings (unless `stats` gives them), and the reduction."""

    method: str
    num_experts: int | list[int]  # one count for every layer, or one per layer
    method_options: dict = field(default_factory=dict)  # e.g. rank, rank_ratio, adaptive, align_neurons
    export: str = "remap"  # "remap": N router rows + maps (plugin); "vanilla": N'-row router, stock Mixtral;
    # "profile": remap's block, only the changed tensors, the rest read from the source (submoe_format.profile)
    refine_steps: int = 0  # layer-wise refinement after the merge (methods/refine.py): at most this many steps
    correct: bool = False  # least-squares correction vectors per router expert, last (methods/correction.py)
    distill_steps: int = 0  # end-to-end distillation of the written checkpoint's experts (distillation.py)
    choose_end_to_end: bool = False  # output-lsq's two W_D fits, the one closer to the source end to end kept (choice.py)
    stats: str | None = None  # a `submoe calibrate` directory: its statistics instead of calibrating
    sequential: bool = False  # calibrate each layer on the compressed layers' hidden states (calibration/layers.py)

    def command(self) -> list[str]:
        """The `submoe compress` command line that reproduces these options (those left at their
        default, and how the run goes, are not written)."""
        counts = ",".join(map(str, self.num_experts)) if isinstance(self.num_experts, list) else str(self.num_experts)
        out = ["submoe", "compress", "--model", str(self.model), "--out", str(self.out), "--method", self.method,
               "--num-experts", counts]
        given = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in (*self.RUN_ONLY, "model", "method", "num_experts", "method_options")
                 and getattr(self, f.name) != (f.default if f.default is not MISSING else f.default_factory())}
        for name, value in {**given, **self.method_options}.items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            out += [flag] if value is True else [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
        return out


def layer_budgets(opts: CompressOptions, source: LazyCheckpoint, arch: SourceArchitecture,
                  method: Method) -> list[int | None]:
    """The target expert count of every decoder layer (None: no routed experts there), or one
    clear error for settings that cannot work on this source with this method."""
    config = source.config
    if BLOCK_KEY in config:
        raise CompressError(f"{opts.model} is already a compressed checkpoint (config.json has a `{BLOCK_KEY}` "
                            f"block): compress the source model instead")
    quant = config.get("quantization_config")
    if quant:  # e.g. DeepSeek-V3's block-wise FP8 on the hub: its weights are meaningless without their scales
        raise CompressError(f"{opts.model} is a quantized checkpoint ({quant.get('quant_method', 'quantization_config')} "
                            f"in config.json): the compressor reads bf16/fp16/fp32 weights. Dequantize it first "
                            f"(for DeepSeek-V3's FP8: its inference/fp8_cast_bf16.py), compress that, and quantize "
                            f"the result if you serve quantized")
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
    _check_export(opts, arch, {c for c in counts if c is not None})
    if opts.export == "profile" and not source.stored_as_named():
        raise CompressError(f"--export profile reads the unchanged tensors from {source.dir} as they are stored, so it "
                            f"needs them under {arch.layout.model_type}'s own names, one tensor per expert; this source "
                            f"stores experts in another naming or fused: use --export remap")
    if method.drops_experts and opts.export != "vanilla":
        _check_drops(arch, {c for c in counts if c is not None})
    if opts.sequential and opts.stats:
        raise CompressError(f"--sequential calibrates each layer on what the *compressed* layers before it produce, "
                            f"which depends on the method and ratio, so it cannot reuse --stats {opts.stats}: drop one")
    if opts.sequential and method.joint_layers > 1:
        raise CompressError("--sequential merges a layer before calibrating the next, --adaptive groups adjacent "
                            "layers jointly: drop one")
    if opts.correct or method.corrects:
        _check_corrections(opts, method)
    if opts.distill_steps < 0:
        raise CompressError(f"--distill-steps must be >= 0, got {opts.distill_steps}")
    if opts.distill_steps and opts.export != "remap":
        raise CompressError(f"--distill-steps trains the merged experts behind the remap tables and rewrites "
                            f"them in the checkpoint; --export {opts.export} does not hold them so: use --export remap")
    if opts.choose_end_to_end:
        _check_choice(opts)
    if opts.refine_steps < 0:
        raise CompressError(f"--refine-steps must be >= 0, got {opts.refine_steps}")
    if not source.has_tokenizer():
        raise CompressError(f"{source.dir} has no tokenizer.json / tokenizer_config.json: calibration text "
                            f"cannot be tokenized, and the output could not be served")
    opts.check()
    return counts


def _check_export(opts: CompressOptions, arch: SourceArchitecture, moe_counts: set[int]) -> None:
    if opts.export not in ("remap", "vanilla", "profile"):
        raise CompressError(f"--export must be remap, vanilla or profile, got {opts.export!r}")
    if opts.export != "vanilla":
        return
    if len(moe_counts) != 1:
        raise CompressError(f"--export vanilla writes a stock {arch.layout.source_architecture}, whose layers all have "
                            f"the same expert count: give one --num-experts, or use --export remap for per-layer counts")
    if min(moe_counts) < arch.routing.top_k:
        raise CompressError(f"--export vanilla needs at least top_k={arch.routing.top_k} experts per layer, "
                            f"got {min(moe_counts)}")
    if arch.routing.num_groups > 1:
        raise CompressError("--export vanilla cannot keep grouped top-k routing (n_group expert groups over fewer "
                            "router rows): use --export remap, which routes over the source's groups")
    if arch.layout.routing.bias_name:
        raise CompressError("--export vanilla cannot keep the per-layer score-correction bias (e_score_correction_bias) "
                            "over fewer router rows: use --export remap, which routes over the source's experts")


def _check_corrections(opts: CompressOptions, method: Method) -> None:
    what = "--correct" if opts.correct else f"--method {opts.method} serves pruned experts as constant vectors"
    if opts.export != "remap":
        raise CompressError(f"{what} writes correction vectors, which the vLLM plugin adds to each layer's output "
                            f"(format 4); --export {opts.export} cannot carry them: use --export remap")
    if opts.sequential:
        raise CompressError(f"{what} writes correction vectors, which --sequential calibration does not carry to "
                            f"the next layer yet: drop --sequential")


def _check_choice(opts: CompressOptions) -> None:
    if opts.method != "output-lsq":
        raise CompressError(f"--choose-end-to-end chooses between output-lsq's two fits of W_D; --method {opts.method} "
                            f"has one: use --method output-lsq (the default preset's), or drop --choose-end-to-end")
    if opts.method_options.get("function_weight") is not None:
        raise CompressError("--choose-end-to-end sets --function-weight itself (0, then 3): drop --function-weight")
    if opts.sequential:
        raise CompressError("--choose-end-to-end compresses both fits from one calibration, which --sequential makes "
                            "depend on the fit: drop one")


def _check_drops(arch: SourceArchitecture, moe_counts: set[int]) -> None:
    if min(moe_counts) < arch.routing.top_k:
        raise CompressError(f"pruning keeps {min(moe_counts)} experts in a layer but every token routes to "
                            f"top_k={arch.routing.top_k}: keep at least {arch.routing.top_k}, or pass "
                            f"--substitute-pruned to serve pruned experts' tokens by the most similar kept ones")
    if arch.routing.num_groups > 1:
        raise CompressError("dropping router experts would unbalance grouped top-k routing (n_group expert "
                            "groups): pass --substitute-pruned, which keeps every router row")
