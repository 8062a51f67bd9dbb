"""Expert-reduction methods, by the name `submoe compress --method` takes."""
from __future__ import annotations

import inspect

from .base import Grouping, LayerResult, Merge, Method, MethodError, reduce_layer, reduce_layers
from .baselines import Average, FrequencyPrune, RandomMerge
from .hcsmoe import HCSMoE, MSMoE
from .mergemoe import CalibrationWarning, MergeMoE
from .mone import MoNE
from .output_lsq import OutputLSQ
from .ream import REAM
from .reap import MAN, MSAN, REAP
from .submoe import SubMoE

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    SubMoE, OutputLSQ, MergeMoE, HCSMoE, MSMoE, REAP, REAM, MoNE, MAN, MSAN, FrequencyPrune, Average, RandomMerge)}


def method_options(name: str) -> set[str]:
    return set(inspect.signature(METHODS[name].__init__).parameters) - {"self", "args", "kwargs"}


def make_method(name: str, **options) -> Method:
    """The method `name` with the options given (None = not given); an option the method does not
    take is an error naming the methods that do."""
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    for k in given:
        if k not in method_options(name):
            takers = [m for m in METHODS if k in method_options(m)]
            raise MethodError(f"--{k.replace('_', '-')} does not apply to --method {name}; "
                              f"it applies to: {', '.join(takers)}")
    return METHODS[name](**given)


__all__ = ["METHODS", "CalibrationWarning", "Grouping", "LayerResult", "Merge", "Method", "MethodError",
           "make_method", "method_options", "reduce_layer", "reduce_layers"]
