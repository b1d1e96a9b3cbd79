"""The gated MLP: a diagonal scaling folded into the norm (gate/up) and into up's columns (down),
optional online block rotations of the gate/up and down inputs, every linear rounded by GPTQ under
the statistics propagated to its input."""

from __future__ import annotations

import torch

from ..config import keeps
from . import stats
from .geometry import LayerResult, LayerWeights
from .site import (
    Rounding,
    SiteTransform,
    diagonal_scaling,
    hessian,
    identity_moments,
    learned_scaling,
    merge_parts,
    round_site,
)
from .online import choose_online


def optimise_mlp(layer: LayerWeights, how: Rounding, result: LayerResult, residual: stats.Moments | None):
    """Round gate/up/down of one layer into `result`; the residual statistics after the MLP sublayer."""
    mlp = layer.mlp
    w_gate, w_up, w_down = mlp_weights(layer)
    gate_key, up_key = (f"{mlp.gate}#gate", f"{mlp.up}#up") if mlp.fused else (mlp.gate, mlp.up)
    device = w_gate.device
    x = identity_moments(w_gate.shape[0], device) if residual is None else stats.rms_norm(residual, layer.gain(mlp.gain))
    h = hessian(layer.input_of(mlp.gate, x), layer.form_of(mlp.gate, how.config.hessian))
    u = identity_moments(w_down.shape[0], device) if residual is None else stats.gated_mlp_hidden(x, w_gate, w_up, mlp.activation)
    hd = hessian(layer.input_of(mlp.down, u), layer.form_of(mlp.down, how.config.hessian))
    del x  # its K x K covariance is not needed past h and u
    dt = layer.scale_dtypes

    a, tags = diagonal_scaling([w_gate, w_up], h, how.at(mlp.gate), mlp.gain_foldable, "norm-diag", layer.trusted(mlp.gate))
    d, down_tags = diagonal_scaling([w_down], hd, how.at(mlp.down), True, "up-down-diag", layer.trusted(mlp.down))

    # Each group's sites, with an optional online rotation `t` of its input (tagged `tag`); `columns`,
    # `sample`: online.py's column sample. up's columns absorb d (W_up' = W_up diag(d)); a column
    # scaling leaves up's rounding unchanged.
    def gate_up_with(a, tags):
        def make(t=None, tag=None, columns=None, sample=None):
            extra = [tag] if tag else []
            cut = _columns(columns)
            col = d if d is None or columns is None else d[::columns]
            return {
                gate_key: round_site(cut(w_gate), h, dt[mlp.gate], how.at(mlp.gate), SiteTransform(row=a, online=t), tags + extra, sample),
                up_key: round_site(cut(w_up), h, dt[mlp.up], how.at(mlp.up), SiteTransform(row=a, col=col, online=t), tags + down_tags + extra, sample),
            }

        return make

    def down_with(d, down_tags):
        def make(t=None, tag=None, columns=None, sample=None):
            extra = [tag] if tag else []
            cut = _columns(columns)
            return {mlp.down: round_site(cut(w_down), hd, dt[mlp.down], how.at(mlp.down), SiteTransform(row=d, online=t), down_tags + extra, sample)}

        return make

    # Learned diagonals replace the searched ones where their sites round better; d first (up's
    # columns carry it), then a. Without learning, a group's unrotated rounding is made only if
    # online.py needs it.
    down, lower = down_with(d, down_tags), None
    learned = learned_scaling([w_down], hd, how.at(mlp.down), d, True, "up-down-diag", layer.trusted(mlp.down), dt[mlp.down])
    if learned is not None:
        lower = down()
        other = down_with(*learned)
        trial = other()
        if _better(trial, lower, how):
            (d, down_tags), down, lower = learned, other, trial
    gate_up, pair = gate_up_with(a, tags), None
    learned = learned_scaling([w_gate, w_up], h, how.at(mlp.gate), a, mlp.gain_foldable, "norm-diag", layer.trusted(mlp.gate), dt[mlp.gate])
    if learned is not None:
        pair = gate_up()
        other = gate_up_with(*learned)
        trial = other()
        if _better(trial, pair, how):
            (a, tags), gate_up, pair = learned, other, trial
    trial = None
    # Online rotations cost time at inference: each is kept only where it lowers its sites' proxy enough.
    # A learned block sees the weights and H as the rotation does: after the diagonal scaling.
    outcomes = {}
    for where, make, plain, k, group, hh, scaling, dtype in (
        ("gate_up", gate_up, pair, w_gate.shape[0], [w_gate, w_up], h, a, dt[mlp.gate]),
        ("down", down, lower, w_down.shape[0], [w_down], hd, d, dt[mlp.down]),
    ):
        if where not in how.config.online:
            outcomes.update(plain if plain is not None else make())
            continue
        rows = SiteTransform(row=scaling)

        def learn_from(rows=rows, group=group, hh=hh, dtype=dtype):  # scaled copies only when learning
            return [rows.forward(w) for w in group], rows.hessian(hh), dtype

        outcomes.update(choose_online(make, plain, k, device, how, result.online, learn_from))
    pair = lower = None  # the codes a rotation replaced are freed here
    if a is not None:
        result.gains[mlp.gain] = layer.gain(mlp.gain).to(torch.float32) * a
    if mlp.fused:
        halves = sorted([(mlp.gate_columns, outcomes.pop(gate_key)), (mlp.up_columns, outcomes.pop(up_key))], key=lambda p: p[0])
        outcomes[mlp.gate] = merge_parts([outcome for _, outcome in halves])
        for key in (gate_key, up_key):
            if key in result.online:
                result.online[mlp.gate] = result.online.pop(key)
    result.sites.update(outcomes)

    return residual_after_mlp(layer, residual, u)


def mlp_weights(layer: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_gate, W_up, W_down; a fused gate/up linear holds the first two as column ranges."""
    mlp = layer.mlp
    if mlp.fused:
        w = layer.weights[mlp.gate]
        w_gate, w_up = (w[:, a:b] for a, b in (mlp.gate_columns, mlp.up_columns))
    else:
        w_gate, w_up = layer.weights[mlp.gate], layer.weights[mlp.up]
    return w_gate, w_up, layer.weights[mlp.down]


def residual_after_mlp(layer: LayerWeights, residual: stats.Moments | None, u: stats.Moments | None = None):
    """The residual statistics after the MLP sublayer, from the float weights alone; `u` is the
    hidden units' statistics when the caller has them."""
    if residual is None:
        return residual
    mlp = layer.mlp
    w_gate, w_up, w_down = mlp_weights(layer)
    if u is None:
        u = stats.gated_mlp_hidden(stats.rms_norm(residual, layer.gain(mlp.gain)), w_gate, w_up, mlp.activation)
    y = stats.with_bias(stats.linear(u, w_down), layer.biases.get(mlp.down))
    return residual + stats.sublayer_output(y, layer.gain(mlp.post_gain), mlp.post_norm)


def _columns(stride: int | None):
    """W -> every stride-th column of W (contiguous), or W itself."""
    return (lambda w: w) if stride is None else (lambda w: w[:, ::stride].contiguous())


def _better(trial: dict, current: dict, how: Rounding) -> bool:
    """Whether the sites rounded with a learned transform beat those without (forced: always)."""
    return keeps(how.config, sum(o.error for o in trial.values()), sum(o.error for o in current.values()))
