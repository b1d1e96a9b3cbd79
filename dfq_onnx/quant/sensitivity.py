"""How much each site's rounding error costs, per candidate format, from the weights alone.

A site's error is its proxy relative to its output's energy, tr(D^T S D) / tr(W^T S W), with S the
per-channel variances propagated to its input (the method's own statistics, centred: the mean
direction's part is left out, because round-to-nearest's errors largely cancel along one direction,
which made sites whose input has a large mean (down, late o) look nearly free at 2 bits). The
estimate of a site under a format is that relative error of round-to-nearest times the KL a unit of
it costs for the role (ROLE_SENSITIVITY, measured once) times the method's measured reduction for
the role (REDUCTION); the method then runs once, on the chosen format.

Why: on Gemma 3 270M (Persuasion; 35 linears, every role at layers 0/4/8/12/16, each rounded alone
at int2 g64 sym and int4 g128 asym; tools/site_sensitivity.py), the KL each causes follows the
role factor times the centred relative error within a factor of 1.8 (RMS of log-ratios 0.58), the
relative error alone within 2.6 (0.95; 0.78 with the mean direction kept), while weighting it by
the share of the residual stream its sublayer writes (E||added||^2 / E||after||^2, the `residual`
weighting) misjudges by 3.6x (1.29): the share spans 30x between sites whose KLs are close.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import QuantFormat
from . import grid, rounding, stats
from .attention import _split_qkv, _v_bias, residual_after_attention
from .geometry import LayerWeights
from .mlp import _weights as _mlp_weights
from .mlp import residual_after_mlp
from .site import hessian, identity_moments

# The method's relative proxy over round-to-nearest's at the same format, by role, at 2-4 bits and at
# 8 bits: the median over Gemma 3 270M's 18 layers (dynamo export) of the reports of `dfq-onnx optimize
# ... --recipe cafeq-int4` at int2 g32/g64 asym, int4 g128 asym and int4 g32 sym (2-4 bits; they agree
# within 0.05 per role) and int8 g128 sym. The V/O pairing and the online rotations gain most (v/o/down).
REDUCTION = {
    "q": (0.37, 0.62), "k": (0.36, 0.60), "v": (0.15, 0.20), "o": (0.15, 0.20),
    "gate": (0.30, 0.51), "up": (0.34, 0.56), "down": (0.16, 0.14),
    "qkv": (0.30, 0.47), "gate_up": (0.32, 0.53),
}  # fmt: skip
OTHER_REDUCTION = (0.30, 0.45)
# The KL one linear alone causes per unit of its (centred) relative error, by role, relative to the
# largest: medians over Gemma 3 270M's layers 0/4/8/12/16 at int2 g64 sym and int4 g128 asym
# (`python tools/site_sensitivity.py --layers 0,4,8,12,16 --windows 2`, Persuasion). An error on
# q/k passes through the softmax and costs ~6x less KL than the same relative error on v.
ROLE_SENSITIVITY = {
    "q": 0.154, "k": 0.126, "v": 1.0, "o": 0.301, "gate": 0.544, "up": 0.762, "down": 0.581,
    "qkv": 0.43, "gate_up": 0.65,
}  # fmt: skip
OTHER_SENSITIVITY = 0.5
WEIGHTINGS = ("relative", "residual")  # the first is the default


@dataclasses.dataclass
class SiteStatistics:
    weight: torch.Tensor  # W[K, N] (a fused linear whole)
    hessian: object  # E[x^T x] at its input (rounding.LowRank)
    scale_dtype: torch.dtype
    share: float  # the share of the residual stream its sublayer writes (1 without statistics)


def layer_sites(layer: LayerWeights, residual: stats.Moments | None) -> tuple[dict[str, SiteStatistics], stats.Moments | None]:
    """Every linear of the layer with the statistics that weigh its error, and the residual
    statistics after the layer (by the method's own propagation)."""
    out: dict[str, SiteStatistics] = {}
    att, mlp = layer.attention, layer.mlp
    dt = layer.scale_dtypes
    if att is not None and (att.q or att.qkv):
        parts = _split_qkv(layer, att)
        first = next(iter(parts.values()))
        x = identity_moments(first.shape[0], first.device) if residual is None else stats.rms_norm(residual, layer.gain(att.gain))
        sites = {name: (layer.weights[name], hessian(x)) for name in ([att.qkv] if att.qkv else [n for n in (att.q, att.k, att.v) if n])}
        v = parts.get("v")
        if att.o and v is not None and att.head_dim and att.num_heads:
            z = stats.attention_output(stats.with_bias(stats.linear(x, v), _v_bias(layer, att)), att.num_heads, att.head_dim)
            sites[att.o] = (layer.weights[att.o], hessian(z))
        after = residual_after_attention(layer, residual, x)
        share = _share(residual, after)
        out.update({name: SiteStatistics(w, h, dt[name], share) for name, (w, h) in sites.items()})
        residual = after
    if mlp is not None:
        w_gate, w_up, w_down = _mlp_weights(layer)
        x = identity_moments(w_gate.shape[0], w_gate.device) if residual is None else stats.rms_norm(residual, layer.gain(mlp.gain))
        u = identity_moments(w_down.shape[0], w_down.device) if residual is None else stats.gated_mlp_hidden(x, w_gate, w_up, mlp.activation)
        after = residual_after_mlp(layer, residual, u)
        share = _share(residual, after)
        out.update({name: SiteStatistics(layer.weights[name], hessian(x), dt[name], share) for name in dict.fromkeys((mlp.gate, mlp.up))})
        out[mlp.down] = SiteStatistics(w_down, hessian(u), dt[mlp.down], share)
        residual = after
    return out, residual


def head_site(weight: torch.Tensor, residual: stats.Moments | None, gain: torch.Tensor | None, scale_dtype) -> SiteStatistics:
    """The lm_head under the statistics at the final norm's output; it writes the logits (share 1)."""
    x = identity_moments(weight.shape[0], weight.device) if residual is None else stats.rms_norm(residual, gain)
    return SiteStatistics(weight, hessian(x), scale_dtype, 1.0)


def _share(before: stats.Moments | None, after: stats.Moments | None) -> float:
    """E||added||^2 / E||after||^2 for after = before + added (independent): 1 without statistics."""
    if before is None or after is None:
        return 1.0
    added = float((after.variances() - before.variances()).sum() + ((after.mean - before.mean) ** 2).sum())
    total = float(after.variances().sum() + (after.mean**2).sum())
    return max(added, 0.0) / max(total, 1e-30)


ESTIMATE_COLUMNS = 128  # evenly spaced columns the estimate rounds (each column rounds on its own)


def relative_errors(site: SiteStatistics, formats: list[QuantFormat], centred: bool = True) -> list[float]:
    """Round-to-nearest's relative proxy of the site at each format under the centred statistics (or,
    `centred` False, with the mean direction kept), on ESTIMATE_COLUMNS of its columns (the proxy is
    a sum over columns; a column's rounding does not depend on the others)."""
    w = site.weight
    if w.shape[1] > ESTIMATE_COLUMNS:
        w = w[:, torch.linspace(0, w.shape[1] - 1, ESTIMATE_COLUMNS, device=w.device).long()]
    h = site.hessian
    if centred and isinstance(h, rounding.LowRank):
        h = rounding.LowRank(h.diag, torch.zeros_like(h.vec))
    ref = rounding.weighted_error(w, None, h) or 1.0
    return [rounding.weighted_error(w, grid.fake_quant(w, f, site.scale_dtype), h) / ref for f in formats]


def estimated_loss(site: SiteStatistics, role: str, fmt: QuantFormat, relative_error: float, weighting: str = "relative", method: bool = True) -> float:
    """The site's estimated contribution to the model's loss at `fmt`, whose round-to-nearest relative
    error is `relative_error` (see the module's docstring); `method` False: round-to-nearest runs."""
    weight = site.share if weighting == "residual" else ROLE_SENSITIVITY.get(role, OTHER_SENSITIVITY)
    low, eight = REDUCTION.get(role, OTHER_REDUCTION)
    return weight * relative_error * ((eight if fmt.bits == 8 else low) if method else 1.0)
