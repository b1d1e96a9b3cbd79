"""The data-free method on one transformer layer.

1. Input statistics: the residual stream's mean and covariance arrive from the layers before
   (stats.py); the norms turn them into E[x^T x] at the q/k/v and gate/up inputs, the value
   projection into o's, the gated MLP into down's. With the identity prior every E[x^T x] is I.
2. Free diagonal transforms: a per-channel scaling in front of q/k/v and of gate/up (folded into
   the norm gains) and between up and down (folded into up's columns), chosen by a small search
   scored by the weighted rounding error; "no transform" is always a candidate.
3. Adaptive rounding: every linear is rounded by GPTQ with H = E[x^T x] (scales chosen per block
   by a weighted search). o is rounded through the V/O product: it compensates the rounding of
   its KV head's V (least-squares target, GPTQ with the statistics of the rounded V).

Errors are measured in the original function space with the same statistics: tr(D^T H D) for a
linear, E||z W_o - z^ W_o^||^2 for o. A site whose result is not better than round-to-nearest
keeps round-to-nearest; a transform that does not lower its group's error is dropped.

4. Learned transforms (learn.py): from the searched ones, Adam through a straight-through round on
   the same proxy refines the V/O block (by default), the diagonals and the online blocks (recipe
   knobs); each is kept only where its sites' final rounding is better with it.

Where each step lives: site.py (one linear), attention.py (Q/K), value_output.py (V/O), mlp.py,
learn.py (the learners).
"""

from __future__ import annotations

import torch

from ..config import MethodConfig, Prior, QuantFormat, Rotation
from . import rounding, stats
from .attention import optimise_attention, residual_after_attention
from .geometry import LayerResult, LayerWeights
from .mlp import optimise_mlp, residual_after_mlp
from .site import Rounding, round_site


def optimise_layer(
    layer: LayerWeights,
    fmt: QuantFormat,
    config: MethodConfig,
    residual: stats.Moments | None = None,
    keep_float: bool = False,
    formats: dict[str, QuantFormat] | None = None,
    index: int = 0,
    float_sites: frozenset[str] = frozenset(),
) -> LayerResult:
    """Round every linear of the layer; `keep_float` also returns the transformed float weights;
    `formats` gives linears a format other than `fmt`; `index` (the layer's) seeds random blocks,
    so a layer's bytes do not depend on the layers before it (resume); `float_sites` are written in
    float, so no other linear compensates their rounding."""
    rng = torch.Generator().manual_seed(config.seed * 100_003 + index) if config.rotation == Rotation.RANDOM else None
    how = Rounding(fmt, config, keep_float, formats or {}, rng, frozenset(float_sites))
    result = LayerResult(sites={})
    done: set[str] = set()
    propagate = config.prior == Prior.PROPAGATED and residual is not None
    att, mlp = layer.attention, layer.mlp
    if att is not None and (att.q or att.qkv):
        residual = never_worse_than_rtn(optimise_attention, layer, how, result, residual if propagate else None)
        done.update(x for x in (att.q, att.k, att.v, att.qkv, att.o) if x)
    if mlp is not None:
        residual = never_worse_than_rtn(optimise_mlp, layer, how, result, residual if propagate else None)
        done.update((mlp.gate, mlp.up, mlp.down))
    for name, w in layer.weights.items():
        if name not in done:
            h = rounding.LowRank.identity(w.shape[0], w.device)
            result.sites[name] = round_site(w, h, layer.scale_dtypes[name], how.at(name), None, [])
    result.residual = residual if propagate else None
    for name, bias in layer.biases.items():
        site = result.sites.get(name)
        if site is not None and site.columns is not None:
            result.biases[name] = site.columns(bias.to(torch.float32))
    return result


def propagate_layer(layer: LayerWeights, config: MethodConfig, residual: stats.Moments | None) -> stats.Moments | None:
    """The residual statistics after the layer without rounding anything: the `residual` that
    optimise_layer returns, by the same functions on the same float weights (so a statistics pass
    ahead of the optimisation feeds every layer exactly what a sequential run would)."""
    if config.prior != Prior.PROPAGATED or residual is None:
        return None
    if layer.attention is not None and (layer.attention.q or layer.attention.qkv):
        residual = residual_after_attention(layer, residual)
    if layer.mlp is not None:
        residual = residual_after_mlp(layer, residual)
    return residual


def never_worse_than_rtn(optimise, layer: LayerWeights, how: Rounding, result: LayerResult, residual):
    """Run one sublayer (attention or MLP) into `result`. Its transforms are shared by its sites (a
    norm scaling by q/k/v, a V/O transform by the pair), so where any site ends worse than
    round-to-nearest of its original weight under the same statistics, the sublayer is redone
    without transforms, where every site's own fallback is that round-to-nearest."""
    trial = LayerResult(sites={})
    after = optimise(layer, how, trial, residual)
    if not how.config.force_transforms and any(s.error > s.rtn_error * (1 + RTN_TOLERANCE) for s in trial.sites.values()):
        trial = LayerResult(sites={})
        after = optimise(layer, how.untransformed(), trial, residual)
        for outcome in trial.sites.values():
            outcome.transforms.append("no-transform-fallback")
    result.sites.update(trial.sites)
    result.gains.update(trial.gains)
    result.online.update(trial.online)
    return after


RTN_TOLERANCE = 1e-6  # relative: the float32 proxies of equal weights agree to far better than this
