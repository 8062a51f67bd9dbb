"""Expert-reduction methods, by the name `submoe compress --method` takes."""
from __future__ import annotations

from .base import ExpertReducer, LayerResult, LayerStats, MethodError
from .baselines import Average, FrequencyPrune
from .submoe import SubMoE

METHODS: dict[str, type[ExpertReducer]] = {m.name: m for m in (SubMoE, Average, FrequencyPrune)}


def make_method(name: str, **options) -> ExpertReducer:
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    if name != "submoe":
        given = {k: v for k, v in options.items() if v is not None}
        if given:
            raise MethodError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only applies to --method submoe")
        return METHODS[name]()
    return METHODS[name](**options)


__all__ = ["METHODS", "ExpertReducer", "LayerResult", "LayerStats", "MethodError", "make_method"]
