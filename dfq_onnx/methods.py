"""The registry from a method's config type to the code that quantizes one unit of work.

A unit is one transformer layer (its attention and MLP linears, with their pairing), or a
group of linears outside the layers. A method gets the float weights of the unit and
returns their quantized forms, plus any float tensors it changed (e.g. folded norm gains).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .config import Method, MethodConfig, QuantFormat
from .graph.sites import Attention, Linear, Mlp
from .quant import grid


@dataclasses.dataclass
class Unit:
    """The linears optimised together (one layer), with the structure that pairs them."""

    label: str
    layer: int | None
    linears: list[Linear]
    attention: Attention | None = None
    mlp: Mlp | None = None


@dataclasses.dataclass
class UnitResult:
    quantized: dict[str, grid.Quantized]
    changed: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # initializer -> new values
    transforms: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # linear -> transforms used


MethodFn = Callable[[Unit, dict[str, torch.Tensor], QuantFormat, dict[str, torch.dtype], MethodConfig], UnitResult]

_REGISTRY: dict[Method, MethodFn] = {}


def register(method: Method) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[method] = fn
        return fn

    return deco


def method_for(config: MethodConfig) -> MethodFn:
    return _REGISTRY[config.name]


@register(Method.RTN)
def round_to_nearest(
    unit: Unit,
    weights: dict[str, torch.Tensor],
    fmt: QuantFormat,
    scale_dtypes: dict[str, torch.dtype],
    config: MethodConfig,
) -> UnitResult:
    return UnitResult(quantized={name: grid.rtn(w, fmt, scale_dtypes[name]) for name, w in weights.items()})
