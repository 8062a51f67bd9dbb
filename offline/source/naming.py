"""The expert namings a source checkpoint may be stored in, read as the family's own.

The compressor works in one naming per family, the one vLLM loads (submoe_format.families: Mixtral's
`block_sparse_moe.experts.{e}.w1`, the others' `mlp.experts.{e}.gate_proj`), and writes only that.
Checkpoints of the same architecture arrive in other namings too:

    per-expert, other names   `experts.{e}.gate_proj/up_proj/down_proj` for Mixtral (llm-compressor's
                              linearised experts), `w1/w3/w2` for the others
    the MoE module renamed    Mixtral's `block_sparse_moe` saved as `mlp` (transformers 5)
    fused experts             `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I], one
                              tensor per layer (transformers 5 `save_pretrained(save_original_format=False)`)

`canonical_sources` maps every canonical name to where it is stored: a whole tensor, or expert e's
rows of a fused one (read as a view, never copied). Pure: names and shapes in, a table out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping

from submoe_format.errors import SubMoEError
from submoe_format.families import Family

# W_G, W_D, W_U under every per-expert name they are stored with
PROJECTION_NAMES = {"gate": ("gate_proj", "w1"), "down": ("down_proj", "w2"), "up": ("up_proj", "w3")}
FUSED_GATE_UP, FUSED_DOWN = "gate_up_proj", "down_proj"
MOE_MODULE_ALIASES = ("mlp",)  # transformers 5 names every family's MoE module `mlp`

_MOE_TENSOR = re.compile(r"(model\.layers\.(\d+)\.)(\w+)\.(.+)")
_PER_EXPERT = re.compile(r"experts\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(rf"experts\.({FUSED_GATE_UP}|{FUSED_DOWN})")


class NamingError(SubMoEError):
    """A checkpoint whose tensor names cannot be read as one model's."""


@dataclass(frozen=True)
class Stored:
    """Where a canonical tensor lies: `name`, or expert `expert`'s `rows` of the fused tensor `name`."""

    name: str
    expert: int | None = None
    rows: slice | None = None

    def select(self, tensor):
        """The canonical tensor out of the stored one (a view)."""
        if self.expert is not None:
            tensor = tensor[self.expert]
        return tensor if self.rows is None else tensor[self.rows]


def canonical_sources(family: Family, shapes: Mapping[str, tuple[int, ...]],
                      hidden: int | None = None) -> dict[str, Stored]:
    """Canonical name -> where it is stored, for every tensor of a checkpoint (`shapes`: stored name
    -> shape; `hidden`: the config's hidden size, which a fused tensor's shape must show where this
    reader expects it). A canonical name stored twice (two namings mixed) is refused, naming both."""
    out: dict[str, Stored] = {}
    for name, shape in shapes.items():
        for canonical, stored in _canonical(family, name, tuple(shape), hidden):
            if canonical in out:
                raise NamingError(f"{canonical} is stored twice, as {out[canonical].name} and as {name}: "
                                  f"a checkpoint holds each tensor under one naming")
            out[canonical] = stored
    return out


def _canonical(family: Family, name: str, shape: tuple[int, ...], hidden: int | None) -> Iterator[tuple[str, Stored]]:
    m = _MOE_TENSOR.fullmatch(name)
    if m is None or m.group(3) not in (family.moe_prefix, *MOE_MODULE_ALIASES):
        yield name, Stored(name)
        return
    layer, rest = int(m.group(2)), m.group(4)
    if per_expert := _PER_EXPERT.fullmatch(rest):
        expert, proj = int(per_expert.group(1)), per_expert.group(2)
        which = next((w for w, names in PROJECTION_NAMES.items() if proj in names), None)
        if which is not None:
            yield family.expert_tensor(layer, expert, which), Stored(name)
            return
    elif fused := _FUSED.fullmatch(rest):
        yield from _split_fused(family, layer, name, fused.group(1), shape, hidden)
        return
    yield f"{m.group(1)}{family.moe_prefix}.{rest}", Stored(name)


def _split_fused(family: Family, layer: int, name: str, kind: str, shape: tuple[int, ...], hidden: int | None):
    hidden_dim = 2 if kind == FUSED_GATE_UP else 1  # a transposed layout ([E, H, 2I]) is not read as this one
    if len(shape) != 3 or (kind == FUSED_GATE_UP and shape[1] % 2) or \
            (hidden is not None and shape[hidden_dim] != hidden):
        want = "[experts, 2 x intermediate, hidden]" if kind == FUSED_GATE_UP else "[experts, hidden, intermediate]"
        raise NamingError(f"fused expert tensor {name} has shape {list(shape)}, not {want} "
                          f"(hidden size {hidden})")
    half = shape[1] // 2
    for e in range(shape[0]):
        if kind == FUSED_GATE_UP:
            yield family.expert_tensor(layer, e, "gate"), Stored(name, e, slice(0, half))
            yield family.expert_tensor(layer, e, "up"), Stored(name, e, slice(half, 2 * half))
        else:
            yield family.expert_tensor(layer, e, "down"), Stored(name, e)
