"""Merged experts behind a routing remap, inside vLLM's own model classes.

A compressed checkpoint is served by the source architecture's vLLM model, built unchanged
(attention, norms, shared experts, dense layers, weight loading) except for one thing: each MoE
layer's fused experts. While the model is constructed, the architecture module's
`FusedMoEFactory` is swapped for `remapped_fused_moe`, which receives exactly the routing
arguments vLLM derives from the config (renormalisation, grouped top-k, scoring function,
routed scaling factor, ...) and builds

  - the router vLLM would build for the N router experts (the source's routing, exactly), wrapped
    by `RemappedRouter`, which maps the chosen ids to merged experts on the device; and
  - vLLM's fused MoE over the layer's N' merged experts, with that router.

The ids the router returns are global merged-expert ids (0..N'-1); under expert parallelism
vLLM's expert map turns them into each rank's local ids, as it does for any MoE.

A corrected layer (format 4) adds Σ_k w_k correction[i_k] over each token's router experts to the
layer's output (its constant experts go to the kernel with weight 0). The term is computed by the
custom op `submoe::correction` from the same inputs and the same router, after vLLM's MoE layer,
so torch.compile sees an opaque op (as vLLM's own MoE op) and CUDA graphs replay it.
"""
from __future__ import annotations

import itertools
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from safetensors import safe_open

from submoe_format.checkpoint import CheckpointFormatError, SubMoEBlock, check_all_present, check_tensor_shape, \
    correction_tensor, dropped_experts, expected_expert_tensors, layout_for, merged_count, parse_block
from submoe_format.profile import check_source, source_tensors
from ..vllm_compat import internal

FusedMoEFactory = internal("FusedMoEFactory")
RoutingMethodType = internal("RoutingMethodType")
FusedMoERouter = internal("FusedMoERouter")
create_fused_moe_router = internal("create_fused_moe_router")
extract_layer_index = internal("extract_layer_index")


class RemappedRouter(FusedMoERouter):
    """The source architecture's router over N experts, then `expert_map[ids]` (no host sync).

    Two chosen router experts that map to one merged expert both stay in the top-k list: the
    fused kernels accept duplicate ids and add their weights, which is exactly the merged forward.
    A dropped router expert (None in the map) has its logit set to -inf first, so the source
    routing runs over the live experts only, as a pruned N'-row router does. A constant expert
    (None in the map, routed as usual) reaches the kernel with weight 0: its correction row serves it.
    """

    def __init__(self, source_router: FusedMoERouter, expert_map: list[int | None], constant: tuple[int, ...] = (),
                 hidden_size: int = 0, output_scale: float = 1.0):
        super().__init__(eplb_state=None)
        self.source_router = source_router
        # Built under vLLM's device context at model construction, so they live on the model's device.
        # A dropped expert is never chosen (at least top_k live ones remain); its id 0 only keeps the
        # table a valid index for kernels that do not bounds-check.
        self.expert_map = torch.tensor([0 if e is None else e for e in expert_map], dtype=torch.int32)
        dropped = dropped_experts(expert_map, constant)
        self.dropped = torch.tensor([i in dropped for i in range(len(expert_map))]) if dropped else None
        self.served = torch.tensor([i not in constant for i in range(len(expert_map))]) if constant else None
        # [N, H] in the model's dtype, loaded with the weights (SubMoEModel.load_weights); None: no correction
        self.correction = torch.zeros(len(expert_map), hidden_size) if hidden_size else None
        self.output_scale = output_scale  # the routed scaling the runner applies to the output, if it does

    def set_capture_fn(self, capture_fn) -> None:
        self.source_router.set_capture_fn(capture_fn)

    @property
    def routing_method_type(self) -> RoutingMethodType:
        # Custom: no monolithic kernel may fuse the source's routing and skip the remap.
        return RoutingMethodType.Custom

    @property
    def supports_monolithic_kernels(self) -> bool:
        # vLLM 0.33 asks this (0.32 goes by routing_method_type alone): a kernel that routes from the
        # logits itself would skip the remap, so only decomposed backends (select_experts, then experts).
        return False

    def route(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
              topk_indices_dtype: torch.dtype | None = None, input_ids: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, router expert ids) [T, k]: the source routing over the live router experts."""
        if self.dropped is not None:
            router_logits = router_logits.masked_fill(self.dropped, float("-inf"))
        return self.source_router.select_experts(hidden_states, router_logits, topk_indices_dtype, input_ids=input_ids)

    def _select_experts(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                        topk_indices_dtype: torch.dtype | None = None, *,
                        input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.route(hidden_states, router_logits, topk_indices_dtype, input_ids)
        if self.served is not None:
            weights = weights * self.served[ids.long()]
        return weights, self.expert_map[ids.long()].to(ids.dtype)

    def correction_output(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """[T, H] Σ_k w_k correction[i_k], in the hidden states' dtype (summed in float32)."""
        weights, ids = self.route(hidden_states, router_logits)
        term = (weights.float().unsqueeze(-1) * self.correction[ids.long()].float()).sum(1)
        return (term * self.output_scale).to(hidden_states.dtype)


# key -> a corrected layer's router, for the custom op; the key is the layer's prefix and its router's
# id, so two models in one process never share one. Weak: a model's layers keep their routers alive.
_CORRECTED: weakref.WeakValueDictionary[str, RemappedRouter] = weakref.WeakValueDictionary()


@torch.library.custom_op("submoe::correction", mutates_args=())
def correction_op(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer: str) -> torch.Tensor:
    return _CORRECTED[layer].correction_output(hidden_states, router_logits)


@correction_op.register_fake
def _(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


class Corrected:
    """Mixed in before vLLM's MoE layer class of a corrected layer: its output plus the correction term.
    Parameters and weight loading are the layer's own (the correction is the router's tensor)."""

    submoe_layer: str

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = super().forward(hidden_states, router_logits, *args, **kwargs)
        return out + correction_op(hidden_states, router_logits, self.submoe_layer).view_as(out)


def corrected(moe: torch.nn.Module, router: RemappedRouter, prefix: str) -> torch.nn.Module:
    """`moe` (vLLM's MoE layer, its output already all-reduced across tensor-parallel ranks) adding
    `router`'s correction term: each rank adds the same term to the same reduced output."""
    config = getattr(moe, "moe_config", None)
    if getattr(config, "skip_final_all_reduce", False) or getattr(config, "is_sequence_parallel", False):
        raise CheckpointFormatError(f"{prefix} has correction vectors, which this plugin adds to a reduced MoE output; "
                                    f"sequence-parallel MoE leaves it unreduced: serve without it")
    key = f"{prefix}#{id(router)}"
    _CORRECTED[key] = router
    moe.__class__ = type(f"Corrected{type(moe).__name__}", (Corrected, type(moe)), {})
    moe.submoe_layer = key
    return moe


def remapped_fused_moe(block: SubMoEBlock, built: set[int], routers: dict[int, RemappedRouter]):
    """A stand-in for `FusedMoEFactory` that builds layer l's N'_l merged experts behind a remap
    (`routers`: filled with each corrected layer's router)."""

    def factory(*, num_experts: int, top_k: int, hidden_size: int, prefix: str = "", renormalize: bool = True,
                use_grouped_topk: bool = False, num_expert_group: int | None = None, topk_group: int | None = None,
                scoring_func: str = "softmax", routed_scaling_factor: float = 1.0,
                apply_routed_scale_to_output: bool = False, e_score_correction_bias: torch.Tensor | None = None,
                custom_routing_function=None, enable_eplb: bool = False, fuse_shared_experts: bool = False,
                num_redundant_experts: int = 0, **kwargs):
        layer = extract_layer_index(prefix)
        expert_map = block.expert_maps[layer] if layer < len(block.expert_maps) else None
        if expert_map is None:
            raise CheckpointFormatError(f"vLLM builds routed experts for layer {layer} ({prefix}) but the `submoe` "
                                        f"block has no map for it: the checkpoint does not match its config")
        if enable_eplb or num_redundant_experts or fuse_shared_experts:
            raise CheckpointFormatError(
                "a merged checkpoint cannot be served with EPLB or fused shared experts (their expert tables "
                "cannot express N->N' merges): drop --enable-eplb / VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS")
        if num_experts != block.num_router_experts:
            raise CheckpointFormatError(f"layer {layer} routes over {num_experts} experts but the `submoe` block "
                                        f"says {block.num_router_experts} router experts")
        source_router = create_fused_moe_router(
            top_k=top_k, global_num_experts=num_experts, renormalize=renormalize,
            use_grouped_topk=use_grouped_topk, num_expert_group=num_expert_group, topk_group=topk_group,
            scoring_func=scoring_func, e_score_correction_bias=e_score_correction_bias,
            custom_routing_function=custom_routing_function,
            # as FusedMoEFactory does: scaled by the router unless the runner scales the output
            routed_scaling_factor=1.0 if apply_routed_scale_to_output else routed_scaling_factor)
        built.add(layer)
        router = RemappedRouter(source_router, list(expert_map), block.constants(layer),
                                hidden_size if block.is_corrected(layer) else 0,
                                routed_scaling_factor if apply_routed_scale_to_output else 1.0)
        moe = FusedMoEFactory(num_experts=merged_count(expert_map), top_k=top_k, hidden_size=hidden_size,
                              prefix=prefix, renormalize=renormalize, scoring_func=scoring_func,
                              routed_scaling_factor=routed_scaling_factor,
                              apply_routed_scale_to_output=apply_routed_scale_to_output, router=router, **kwargs)
        if block.is_corrected(layer):
            routers[layer] = router
            moe = corrected(moe, router, prefix)
        return moe

    return factory


@contextmanager
def merged_experts(arch_module: ModuleType, hf_config, block: SubMoEBlock,
                   routers: dict[int, RemappedRouter]) -> Iterator[set[int]]:
    """Build a vLLM model of `arch_module` with merged experts: the config shows vLLM the N router
    experts (router rows, routing) while each MoE layer gets its own N'_l fused experts. Yields
    the set of layers that got merged experts; fills `routers` with the corrected layers' routers."""
    key = layout_for(hf_config.to_dict()).num_experts_key(hf_config.to_dict())
    served = getattr(hf_config, key)
    built: set[int] = set()
    original = arch_module.FusedMoEFactory
    arch_module.FusedMoEFactory = remapped_fused_moe(block, built, routers)
    setattr(hf_config, key, block.num_router_experts)
    try:
        yield built
    finally:
        arch_module.FusedMoEFactory = original
        setattr(hf_config, key, served)


def checked_weights(weights: Iterable[tuple[str, torch.Tensor]], config: dict, block: SubMoEBlock,
                    layers: range) -> Iterator[tuple[str, torch.Tensor]]:
    """Check expert and router tensors against the `submoe` block as they stream past: a mis-shaped,
    stray or missing tensor is an error naming it, never a kernel crash."""
    layout = layout_for(config)
    expected = {k: v for k, v in expected_expert_tensors(config, block).items() if int(k.split(".")[2]) in layers}
    seen = set()
    for name, tensor in weights:
        if name.startswith("model.layers.") and int(name.split(".")[2]) not in layers:
            yield name, tensor  # another pipeline stage's layer: vLLM skips it
            continue
        check_tensor_shape(name, tensor.shape, expected, layout)
        seen.add(name)
        yield name, tensor
    check_all_present(seen, expected)


def profile_source_weights(config: dict, block: SubMoEBlock, layers: range) -> Iterator[tuple[str, torch.Tensor]]:
    """What a profile reads from its source, under the served names: every tensor but the routed
    experts, and each kept expert as its served slot. Other pipeline stages' layers and the experts a
    compression dropped or merged away are never read."""
    check_source(block.profile)
    by_file = defaultdict(list)
    for served, t in source_tensors(config, block).items():
        if not served.startswith("model.layers.") or int(served.split(".")[2]) in layers:
            by_file[t.file].append((served, t.name))
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as h:
            for served, name in names:
                yield served, h.get_tensor(name)


class SubMoEModel:
    """Mixed in before a vLLM `...ForCausalLM` class: builds it with merged experts behind the
    checkpoint's remap and validates the `submoe` block before any weight is allocated."""

    arch_module: ModuleType  # the vLLM module whose FusedMoEFactory builds the architecture's MoE layers

    def __init__(self, *, vllm_config, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_config
        self.submoe = parse_block(hf_config.to_dict())
        self.submoe_routers: dict[int, RemappedRouter] = {}  # corrected layers' routers, which hold the corrections
        with merged_experts(self.arch_module, hf_config, self.submoe, self.submoe_routers) as built:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        stage = range(self.model.start_layer, self.model.end_layer)  # this pipeline stage's layers
        wanted = {l for l in stage if self.submoe.expert_maps[l] is not None}
        if built != wanted:
            raise CheckpointFormatError(
                f"the `submoe` block maps experts in layers {sorted(wanted)} but vLLM's "
                f"{self.arch_module.__name__.rsplit('.', 1)[-1]} model routes experts in layers {sorted(built)}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        layers, config = range(self.model.start_layer, self.model.end_layer), self.config.to_dict()
        if self.submoe.profile is not None:
            weights = itertools.chain(weights, profile_source_weights(config, self.submoe, layers))
        return super().load_weights(self._corrections_loaded(checked_weights(weights, config, self.submoe, layers)))

    def _corrections_loaded(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights for vLLM's loader, each correction tensor taken out into its layer's router."""
        names = {correction_tensor(l): r for l, r in self.submoe_routers.items()}
        for name, tensor in weights:
            if name in names:
                names[name].correction.copy_(tensor)
            elif not name.startswith("submoe."):  # another pipeline stage's correction: not this rank's
                yield name, tensor
