"""The registry from a method to the code that quantizes one unit of work.

A unit is one transformer layer (its attention and MLP linears, with their pairing), a group of
linears outside the layers, or the head (lm_head, and the embedding that shares or mirrors it). A
method gets the float weights of the unit (and the norm gains in front of them) and returns their
quantized forms, the float tensors it changed (folded norm gains, moved biases) and, per linear,
the proxy errors it reached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from .config import HessianForm, Method, MethodConfig, Prior, QuantFormat
from .graph.sites import Attention, Embedding, Linear, Mlp, NormGain
from .quant import grid, proxy, sensitivity, site, stats
from .quant.geometry import AttentionGeometry, LayerWeights, MlpGeometry
from .quant.layer import optimise_layer, propagate_layer


@dataclasses.dataclass
class Unit:
    """The linears optimised together (one layer), with the structure that pairs them."""

    label: str
    layer: int | None
    linears: list[Linear]
    attention: Attention | None = None
    mlp: Mlp | None = None
    foldable: set[str] = dataclasses.field(default_factory=set)  # gain initializers we may rewrite
    embedding: Embedding | None = None  # the head unit: the embedding quantized with the lm_head
    head_norm: NormGain | None = None  # the head unit: the final norm in front of the lm_head

    @property
    def is_head(self) -> bool:
        return self.label == HEAD_LABEL


HEAD_LABEL = "lm_head/embedding"


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
    weights: Mapping[str, torch.Tensor]  # linear (or the embedding table) -> W[K, N] on the method's device (may be read on first use)
    scale_dtypes: dict[str, torch.dtype]
    gains: dict[str, torch.Tensor]  # norm gain initializer -> multiplicative gain values
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> output bias [N]
    residual: stats.Moments | None = None  # residual-stream statistics before the unit
    keep_float: bool = False  # return the transformed float weights too (float output)
    formats: dict[str, QuantFormat] = dataclasses.field(default_factory=dict)  # linear -> format, where not the unit's
    float_sites: frozenset[str] = frozenset()  # linears the output keeps in float (excluded)
    # linear, columns -> W[K, N] as float32 [K, <= columns] pieces read from storage one at a time (the
    # lm_head: a 262k-vocabulary matrix is never held whole in float32); None: slice `weights`
    column_chunks: Callable[[str, int], Iterator[torch.Tensor]] | None = None
    inputs: Mapping[str, stats.Moments] = dataclasses.field(default_factory=dict)  # linear -> its input's measured statistics


MethodFn = Callable[[Unit, UnitInput, QuantFormat, MethodConfig], UnitResult]


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """A method as a run sees it: the function that quantizes one unit, and the properties the run,
    the prior, the size budget and verification ask of it (never its name)."""

    name: Method
    quantize: MethodFn
    transforms_weights: bool  # changes weights beyond rounding: the exactness check compares the transformed float model
    optimises_rounding: bool  # rounds by the proxy (not min/max): the budget's loss estimate credits it
    reads_stored_layout: bool  # rounds the weights as stored (any float dtype, either layout), not as float32 W[K, N]
    weighs_by_statistics: bool  # its proxy is weighed by the residual statistics: the prior is built for it

    def __call__(self, unit: Unit, data: UnitInput, fmt: QuantFormat, config: MethodConfig) -> UnitResult:
        return self.quantize(unit, data, fmt, config)


_REGISTRY: dict[Method, QuantMethod] = {}


def register(name: Method, **properties: bool) -> Callable[[MethodFn], MethodFn]:
    """Register the decorated function as method `name`, with the QuantMethod properties given."""

    def deco(fn: MethodFn) -> MethodFn:
        install(QuantMethod(name, fn, **properties))
        return fn

    return deco


def install(method: QuantMethod) -> QuantMethod | None:
    """Make `method` the one its name selects; returns the one it replaces (tools swap solvers in)."""
    previous = _REGISTRY.get(method.name)
    _REGISTRY[method.name] = method
    return previous


def method_for(config: MethodConfig) -> QuantMethod:
    return _REGISTRY[config.name]


@register(Method.RTN, transforms_weights=False, optimises_rounding=False, reads_stored_layout=True, weighs_by_statistics=False)
def round_to_nearest(unit: Unit, data: UnitInput, fmt: QuantFormat, config: MethodConfig, skip: frozenset[str] = frozenset()) -> UnitResult:
    """Min/max rounding of every weight but `skip`; the head unit's in column pieces read one at a time
    (rounding is per column: the bytes of one pass), with the lm_head's proxy errors summed on the way."""
    out = UnitResult(quantized={})
    linears = {lin.node for lin in unit.linears}
    for name in data.weights:
        if name in skip:
            continue
        f, dtype = data.formats.get(name, fmt), data.scale_dtypes[name]
        if data.column_chunks is None:
            out.quantized[name] = grid.rtn(data.weights[name], f, dtype)
            continue
        parts, ref, err = [], 0.0, 0.0
        for chunk in data.column_chunks(name, HEAD_CHUNK):
            parts.append(grid.rtn(chunk, f, dtype))
            if name in linears:  # the report's relative error; an embedding table is no site
                r, e = proxy.quantized_errors(chunk, parts[-1])
                ref, err = ref + r, err + e
        out.quantized[name] = joined(parts)
        if name in linears:
            out.errors[name] = SiteErrors(err, err, ref)
    return out


def joined(parts: list[grid.Quantized]) -> grid.Quantized:
    """Column pieces of one W[K, N], rounded apart, as one quantized matrix."""
    q0 = parts[0]
    zps = None if q0.zero_points is None else torch.cat([p.zero_points for p in parts])
    return grid.Quantized(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zps, q0.k, q0.fmt)


@register(Method.CAFEQ, transforms_weights=True, optimises_rounding=True, reads_stored_layout=False, weighs_by_statistics=True)
def cafeq(unit: Unit, data: UnitInput, fmt: QuantFormat, config: MethodConfig) -> UnitResult:
    if unit.is_head:
        return _head(unit, data, fmt, config)
    layer = _layer_weights(unit, data)
    try:
        result = optimise_layer(
            layer, fmt, config, data.residual, keep_float=data.keep_float, formats=data.formats, index=unit.layer or 0,
            float_sites=data.float_sites,
        )
    except torch.linalg.LinAlgError as exc:  # degenerate weights (e.g. all zero): plain rounding, said so
        out = round_to_nearest(unit, data, fmt, config)
        out.residual = propagate_layer(layer, config, data.residual)  # the statistics never depend on the rounding
        out.notes.append(f"{unit.label}: the method fell back to round-to-nearest ({str(exc).splitlines()[0][:120]})")
        return out
    out = UnitResult(quantized={}, residual=result.residual, online=result.online, biases=result.biases, changed=result.gains)
    for name, site in result.sites.items():
        out.quantized[name] = site.quantized
        out.transforms[name] = site.transforms
        out.errors[name] = SiteErrors(site.error, site.rtn_error, site.reference)
        if site.float_weight is not None:
            out.float_weights[name] = site.float_weight
    return out


def statistics(unit: Unit, data: UnitInput, config: MethodConfig) -> stats.Moments | None:
    """The residual statistics after `unit` that its method returns, computed without rounding:
    they follow from the float weights alone (the statistics pass of a distributed run)."""
    if not method_for(config).weighs_by_statistics or unit.is_head:
        return None
    return propagate_layer(_layer_weights(unit, data), config, data.residual)


def site_statistics(unit: Unit, data: UnitInput, config: MethodConfig):
    """({linear: sensitivity.SiteStatistics}, residual after the unit): what weighs each linear's
    rounding error, under the method's statistics (identity ones for another prior or method)."""
    propagated = method_for(config).weighs_by_statistics and config.prior == Prior.PROPAGATED
    return sensitivity.layer_sites(_layer_weights(unit, data), data.residual if propagated else None)


def _layer_weights(unit: Unit, data: UnitInput) -> LayerWeights:
    return LayerWeights(
        weights=data.weights,
        scale_dtypes=data.scale_dtypes,
        gains=data.gains,
        biases=data.biases,
        attention=_attention_geometry(unit, data),
        mlp=_mlp_geometry(unit, data),
        inputs=data.inputs,
    )


def _head(unit: Unit, data: UnitInput, fmt: QuantFormat, config: MethodConfig) -> UnitResult:
    """The lm_head by GPTQ under the statistics at the final norm's output (the embedding it may
    share follows it); round-to-nearest where those statistics are unknown."""
    lm_head = unit.linears[0].node
    gain = data.gains.get(unit.head_norm.initializer) if unit.head_norm else None
    if data.residual is None or gain is None or not (config.gptq or config.scale_search):
        return round_to_nearest(unit, data, fmt, config)
    form = config.hessian if config.hessian != HessianForm.BY_SOURCE else HessianForm.DIAGONAL_PLUS_MEAN  # the head's are propagated
    h = site.hessian(stats.rms_norm(data.residual, gain), form)
    how = site.Rounding(fmt, config)
    # An untied embedding table: plain rounding (a lookup has no H); the lm_head is not rounded twice.
    out = round_to_nearest(unit, data, fmt, config, skip=frozenset({lm_head}))
    read = data.column_chunks or (lambda name, size: column_chunks(data.weights[name], size))
    q, error, rtn_error, reference = head_rounding(read(lm_head, HEAD_CHUNK), h, data.scale_dtypes[lm_head], how)
    out.quantized[lm_head] = q
    out.errors[lm_head] = SiteErrors(error, rtn_error, reference)
    out.transforms[lm_head] = how.tags()
    return out


HEAD_CHUNK = 16384  # columns (vocabulary entries) rounded at a time: GPTQ's temporaries stay O(K x chunk)


def column_chunks(w: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """W[K, N] held in memory, as [K, <= size] column pieces."""
    for start in range(0, w.shape[1], size):
        yield w[:, start : start + size]


def head_rounding(chunks: Iterable[torch.Tensor], h, dtype, how: site.Rounding) -> tuple[grid.Quantized, float, float, float]:
    """GPTQ column chunk by column chunk (columns are independent under one H), each chunk kept
    only where it beats its round-to-nearest: (quantized, error, rtn error, reference)."""
    parts, error, rtn_error, reference = [], 0.0, 0.0, 0.0
    for chunk in chunks:
        outcome = site.round_site(chunk, h, dtype, how, None, [])
        parts.append(outcome.quantized)
        error, rtn_error, reference = error + outcome.error, rtn_error + outcome.rtn_error, reference + outcome.reference
    return joined(parts), error, rtn_error, reference


def _attention_geometry(unit: Unit, data: UnitInput) -> AttentionGeometry | None:
    att = unit.attention
    if att is None:
        return None
    gain, foldable = _gain(att.input_norm, data, unit)
    packed_unsplit = att.qkv and not att.qkv_split  # a packed projection we cannot split is quantized on its own
    return AttentionGeometry(
        q=att.q,
        k=att.k,
        v=att.v,
        qkv=None if packed_unsplit else att.qkv,
        o=att.o,
        qkv_split=att.qkv_split,
        head_dim=att.head_dim,
        num_heads=att.num_heads,
        num_kv_heads=att.num_kv_heads,
        rope=att.rope,
        rotary_dim=att.rotary_dim,
        qk_norm=att.qk_norm,
        gain=gain,
        gain_foldable=foldable,
        post_gain=_gain(att.output_norm, data, unit)[0],
        post_norm=att.output_norm is not None,
    )


def _mlp_geometry(unit: Unit, data: UnitInput) -> MlpGeometry | None:
    mlp = unit.mlp
    if mlp is None or not (mlp.gate and mlp.up and mlp.down):
        return None
    gain, foldable = _gain(mlp.input_norm, data, unit)
    return MlpGeometry(
        gate=mlp.gate,
        up=mlp.up,
        down=mlp.down,
        gate_columns=mlp.gate_columns,
        up_columns=mlp.up_columns,
        activation=stats.activation_kind(mlp.activation),
        gain=gain,
        gain_foldable=foldable,
        post_gain=_gain(mlp.output_norm, data, unit)[0],
        post_norm=mlp.output_norm is not None,
    )


def _gain(norm: NormGain | None, data: UnitInput, unit: Unit) -> tuple[str | None, bool]:
    """The gain's key when its values were read, and whether it may be rewritten."""
    if norm is None or norm.initializer not in data.gains:
        return None, False
    return norm.initializer, norm.exclusive and norm.initializer in unit.foldable
