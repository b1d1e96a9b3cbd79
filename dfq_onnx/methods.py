"""The registry from a method's config type to the code that quantizes one unit of work.

A unit is one transformer layer (its attention and MLP linears, with their pairing), or a
group of linears outside the layers. A method gets the float weights of the unit (and the norm
gains in front of them) and returns their quantized forms, the float tensors it changed (folded
norm gains) and, per linear, the proxy errors it reached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .config import Method, MethodConfig, QuantFormat
from .graph.sites import Attention, Linear, Mlp, NormGain
from .quant import grid, stats
from .quant.layer import LayerOptions, LayerWeights, optimise_layer


@dataclasses.dataclass
class Unit:
    """The linears optimised together (one layer), with the structure that pairs them."""

    label: str
    layer: int | None
    linears: list[Linear]
    attention: Attention | None = None
    mlp: Mlp | None = None
    foldable: set[str] = dataclasses.field(default_factory=set)  # gain initializers we may rewrite


@dataclasses.dataclass
class SiteErrors:
    error: float
    rtn_error: float
    reference: float


@dataclasses.dataclass
class UnitResult:
    quantized: dict[str, grid.Quantized]
    changed: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # gain initializer -> new gain
    transforms: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # linear -> transforms used
    errors: dict[str, SiteErrors] = dataclasses.field(default_factory=dict)  # linear -> proxy errors
    residual: stats.Moments | None = None  # residual-stream statistics after the unit
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> its bias, moved with its columns
    float_weights: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # transformed W (float)
    online: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> block T of x' = x T
    notes: list[str] = dataclasses.field(default_factory=list)  # what the report should say about this unit


@dataclasses.dataclass
class UnitInput:
    weights: dict[str, torch.Tensor]  # linear -> W[K, N] (float32, on the method's device)
    scale_dtypes: dict[str, torch.dtype]
    gains: dict[str, torch.Tensor]  # norm gain initializer -> multiplicative gain values
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> output bias [N]
    residual: stats.Moments | None = None  # residual-stream statistics before the unit
    keep_float: bool = False  # return the transformed float weights too (float output)


MethodFn = Callable[[Unit, UnitInput, QuantFormat, MethodConfig], UnitResult]

_REGISTRY: dict[Method, MethodFn] = {}


def register(method: Method) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[method] = fn
        return fn

    return deco


def method_for(config: MethodConfig) -> MethodFn:
    return _REGISTRY[config.name]


@register(Method.RTN)
def round_to_nearest(unit: Unit, data: UnitInput, fmt: QuantFormat, config: MethodConfig) -> UnitResult:
    return UnitResult(quantized={name: grid.rtn(w, fmt, data.scale_dtypes[name]) for name, w in data.weights.items()})


@register(Method.CAFEQ)
def cafeq(unit: Unit, data: UnitInput, fmt: QuantFormat, config: MethodConfig) -> UnitResult:
    layer = LayerWeights(weights=data.weights, scale_dtypes=data.scale_dtypes, biases=data.biases)
    att, mlp = unit.attention, unit.mlp
    if att is not None:
        for role in ("q", "k", "v", "qkv", "o"):
            setattr(layer, role, getattr(att, role))
        layer.qkv_split = att.qkv_split
        layer.head_dim, layer.num_heads, layer.num_kv_heads = att.head_dim, att.num_heads, att.num_kv_heads
        layer.rope, layer.rotary_dim, layer.qk_norm = att.rope, att.rotary_dim, att.qk_norm
        layer.attn_gain, layer.attn_gain_foldable = _gain(att.input_norm, data, unit)
        layer.attn_post_gain, _ = _gain(att.output_norm, data, unit)
        layer.attn_post_norm = att.output_norm is not None
        if att.qkv and not att.qkv_split:
            layer.qkv = None  # a packed projection we cannot split is quantized on its own
    if mlp is not None:
        layer.gate, layer.up, layer.down = mlp.gate, mlp.up, mlp.down
        layer.gate_columns, layer.up_columns = mlp.gate_columns, mlp.up_columns
        layer.activation = stats.activation_kind(mlp.activation)
        layer.mlp_gain, layer.mlp_gain_foldable = _gain(mlp.input_norm, data, unit)
        layer.mlp_post_gain, _ = _gain(mlp.output_norm, data, unit)
        layer.mlp_post_norm = mlp.output_norm is not None
    opts = LayerOptions(
        prior=config.prior.value,
        scale_search=config.scale_search,
        diagonal=config.diagonal,
        vo_pairs=config.vo_pairs,
        vo_transform=config.vo_transform,
        qk_transform=config.qk_transform,
        gptq=config.gptq,
        force_transforms=config.force_transforms,
        online=config.online,
        online_block=config.online_block,
        online_min_gain=config.online_min_gain,
        keep_float=data.keep_float,
    )
    try:
        result = optimise_layer(layer, fmt, opts, data.residual)
    except torch.linalg.LinAlgError as exc:  # degenerate weights (e.g. all zero): plain rounding, said so
        out = round_to_nearest(unit, data, fmt, config)
        out.residual = data.residual
        out.notes.append(f"{unit.label}: the method fell back to round-to-nearest ({str(exc).splitlines()[0][:120]})")
        return out
    out = UnitResult(quantized={}, residual=result.residual, online=result.online, biases=result.biases)
    for name, site in result.sites.items():
        out.quantized[name] = site.quantized
        out.transforms[name] = site.transforms
        out.errors[name] = SiteErrors(site.error, site.rtn_error, site.reference)
        if site.float_weight is not None:
            out.float_weights[name] = site.float_weight
    if result.attn_gain is not None:
        out.changed[att.input_norm.initializer] = result.attn_gain
    if result.mlp_gain is not None:
        out.changed[mlp.input_norm.initializer] = result.mlp_gain
    return out


def _gain(norm: NormGain | None, data: UnitInput, unit: Unit) -> tuple[torch.Tensor | None, bool]:
    if norm is None or norm.initializer not in data.gains:
        return None, False
    return data.gains[norm.initializer], norm.exclusive and norm.initializer in unit.foldable
