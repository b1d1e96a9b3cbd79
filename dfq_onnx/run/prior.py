"""The statistics the method weighs rounding errors by, from the weights alone (the propagated
prior): the residual stream's moments at the first layer from the embedding table, carried through
each unit by the method's own propagation. Nothing is rounded here.
"""

from __future__ import annotations

import torch

from .. import methods
from ..config import Prior, Recipe, TokenPrior
from ..errors import DfqError
from ..quant import stats
from .units import layer_units
from .weights import LazyWeights, WeightReader, torch_dtype


def initial_statistics(reader: WeightReader, recipe: Recipe) -> stats.Moments | None:
    """Residual-stream statistics at the first layer, from the embedding table (for the propagated prior)."""
    method = recipe.method
    sites = reader.sites
    if not methods.method_for(method).weighs_by_statistics or method.prior != Prior.PROPAGATED or sites.embedding is None:
        return None
    uniform = embedding_moments(reader)
    post_normed = all(p.output_norm is not None for p in (*sites.attentions, *sites.mlps))
    if sites.lm_head is None or not (method.token_prior == TokenPrior.SELF or (method.token_prior == TokenPrior.POST_NORM and post_normed)):
        return uniform
    weights = token_weights(reader, recipe, uniform)
    return embedding_moments(reader, weights, center=uniform.mean / sites.embedding_scale)


def embedding_moments(reader: WeightReader, weights: torch.Tensor | None = None, center: torch.Tensor | None = None) -> stats.Moments:
    sites = reader.sites
    return stats.embedding_moments(reader.embedding_rows(), sites.embedding_scale, sites.embedding.vocab, reader.device, weights, center)


def token_weights(reader: WeightReader, recipe: Recipe, residual: stats.Moments) -> torch.Tensor:
    """The token distribution the prior starts from (TokenPrior.SELF): the statistics carried through
    every layer from `residual` (no rounding), then the model's next-token probabilities at their
    mean final state (stats.token_distribution)."""
    sites = reader.sites
    label = ""
    try:  # a bad weight is met here first: say which pass and unit read it
        for unit in layer_units(sites, reader.graph):
            label = unit.label
            residual = unit_statistics(reader, recipe, unit, residual)
        label = methods.HEAD_LABEL
        head = sites.linears[sites.lm_head]
        gain = reader.norm_gain(sites.lm_head_norm) if sites.lm_head_norm is not None else None
        pieces = reader.column_chunks(head.weight.initializer, head.weight.transposed, methods.HEAD_CHUNK)
        return stats.token_distribution(residual, None if gain is None else gain.to(reader.device), pieces)
    except DfqError as exc:
        raise DfqError(f"{label} (the prior's token pass): {exc}") from None


def unit_statistics(reader: WeightReader, recipe: Recipe, unit: methods.Unit, residual: stats.Moments | None) -> stats.Moments | None:
    """The statistics after `unit`, equal to the residual `plan_unit` returns, without optimising it
    (the driver of a distributed run chains these ahead of the workers)."""
    if residual is None or unit.is_head:
        return None
    linears = {lin.node: lin for lin in unit.linears}
    data = methods.UnitInput(
        weights=LazyWeights(linears, lambda name: reader.weight(linears[name]).to(reader.device)),  # read on first use, as plan_unit does
        scale_dtypes={},
        gains=reader.device_gains(unit),
        biases=reader.device_biases(unit),
        residual=residual,
    )
    return methods.statistics(unit, data, recipe.method)


def site_statistics(reader: WeightReader, recipe: Recipe, unit: methods.Unit, residual: stats.Moments | None):
    """Each linear of `unit` with the statistics that weigh its rounding error, and the residual
    statistics after it (what a budget allocation estimates its losses from; nothing is rounded)."""
    data = methods.UnitInput(
        weights={lin.node: reader.weight(lin).to(reader.device) for lin in unit.linears},
        scale_dtypes={lin.node: torch_dtype(reader.activation_dtype(lin)) for lin in unit.linears},
        gains=reader.device_gains(unit),
        biases=reader.device_biases(unit),
        residual=residual,
    )
    return methods.site_statistics(unit, data, recipe.method)
