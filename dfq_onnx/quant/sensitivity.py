"""How much each site's rounding error costs, per candidate format, from the weights alone.

A site's error is its proxy relative to its output's energy, tr(D^T S D) / tr(W^T S W), with S the
per-channel variances propagated to its input (the method's own statistics, centred: the mean
direction's part is left out, because round-to-nearest's errors largely cancel along one direction,
which made sites whose input has a large mean (down, late o) look nearly free at 2 bits). The
estimate of a site under a format is that relative error of round-to-nearest times the KL a unit of
it costs for the role (ROLE_SENSITIVITY, measured once) times the KL the method saves over round-to-
nearest for the role (REDUCTION) times a factor per format (FORMAT_FACTOR); the method then runs
once, on the chosen format.

Why: on Gemma 3 270M (Persuasion; 35 linears, every role at layers 0/4/8/12/16, each rounded alone
at int2 g64 sym and int4 g128 asym; tools/research/site_sensitivity.py), the KL each causes follows the
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
from .attention import split_qkv, v_bias, residual_after_attention
from .geometry import LayerWeights
from .mlp import mlp_weights
from .mlp import residual_after_mlp
from .site import hessian, identity_moments

# The method's KL over round-to-nearest's, by role, at 2-4 bits and at 8 bits. 2-4 bits: Gemma 3 270M
# with only that role's linears rounded (int2 g64 sym; `dfq-onnx optimize ... --recipe cafeq-int4 --bits 2
# --block-size 64 --symmetric --exclude <the other roles>`, --method cafeq and rtn), KL on Persuasion
# (4 windows). The method's proxy promised far more for v/o/down (0.15-0.16) than the text shows (o
# alone: none), which sent down projections to 2 bits. 8 bits: the proxy's ratio at 8 bits scaled by
# the same KL/proxy correction (not measured in KL: at 8 bits every loss is small).
REDUCTION = {
    "q": (0.32, 0.54), "k": (0.38, 0.64), "v": (0.29, 0.39), "o": (1.0, 1.0),
    "gate": (0.40, 0.67), "up": (0.46, 0.76), "down": (0.35, 0.31),
    "qkv": (0.33, 0.52), "gate_up": (0.43, 0.71),
}  # fmt: skip
OTHER_REDUCTION = (0.45, 0.65)
# Measured KL of the uniform model at the format over the sum of its estimates, relative to int4
# g128 asym: Gemma 3 270M, every linear at the format by the method, Persuasion 4 windows. A format
# not listed takes the nearest measured block of its bits and symmetry (none measured: 1).
FORMAT_FACTOR = {
    (2, 32, False): 0.95, (2, 64, False): 1.02, (2, 64, True): 1.21,
    (4, 64, False): 0.93, (4, 128, False): 1.0, (4, 32, True): 0.81, (4, 128, True): 0.93,
    (8, 128, True): 0.97,
}  # fmt: skip
# The KL one linear alone causes per unit of its (centred) relative error, by role, relative to the
# largest: medians over Gemma 3 270M's layers 0/4/8/12/16 at int2 g64 sym and int4 g128 asym
# (`python tools/research/site_sensitivity.py --layers 0,4,8,12,16 --windows 2`, Persuasion). An error on
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
        parts = split_qkv(layer, att)
        first = next(iter(parts.values()))
        x = identity_moments(first.shape[0], first.device) if residual is None else stats.rms_norm(residual, layer.gain(att.gain))
        sites = {name: (layer.weights[name], hessian(x)) for name in ([att.qkv] if att.qkv else [n for n in (att.q, att.k, att.v) if n])}
        v = parts.get("v")
        if att.o and v is not None and att.head_dim and att.num_heads:
            z = stats.attention_output(stats.with_bias(stats.linear(x, v), v_bias(layer, att)), att.num_heads, att.head_dim)
            sites[att.o] = (layer.weights[att.o], hessian(z))
        after = residual_after_attention(layer, residual, x)
        share = _share(residual, after)
        out.update({name: SiteStatistics(w, h, dt[name], share) for name, (w, h) in sites.items()})
        residual = after
    if mlp is not None:
        w_gate, w_up, w_down = mlp_weights(layer)
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


def estimate_columns(n: int) -> torch.Tensor:
    """The indices of the columns the estimate rounds, of a W with n columns (all of them if few)."""
    return torch.linspace(0, n - 1, ESTIMATE_COLUMNS).long() if n > ESTIMATE_COLUMNS else torch.arange(n)


def relative_errors(site: SiteStatistics, formats: list[QuantFormat], centred: bool = True) -> list[float]:
    """Round-to-nearest's relative proxy of the site at each format under the centred statistics (or,
    `centred` False, with the mean direction kept), on ESTIMATE_COLUMNS of its columns (the proxy is
    a sum over columns; a column's rounding does not depend on the others)."""
    w = site.weight
    if w.shape[1] > ESTIMATE_COLUMNS:
        w = w[:, estimate_columns(w.shape[1]).to(w.device)]
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
    return weight * relative_error * ((eight if fmt.bits == 8 else low) if method else 1.0) * format_factor(fmt)


def format_factor(fmt: QuantFormat) -> float:
    """FORMAT_FACTOR of the format, or of the nearest measured block with its bits and symmetry (1 if none)."""
    same = [(abs(b - fmt.block_size), f) for (bits, b, sym), f in FORMAT_FACTOR.items() if bits == fmt.bits and sym == fmt.symmetric]
    return min(same)[1] if same else 1.0
