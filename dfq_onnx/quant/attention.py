"""Attention: Q/K rotations that commute with RoPE, and V and O rounded as the pair they are.

q and k are rounded under the statistics of the norm's output (the same for both); a rotation per
KV group and RoPE pair, applied to both q's and k's columns, leaves every score unchanged and is
chosen by the rounding error it gives. V and O are scored by the product they compute,
E||z W_o - z^ O^||^2 with z the attention mix of x V (+ its bias): V is rounded, O compensates the
rounded V, and the two alternate; a free invertible T per KV head (V' = V T, O' = T^-1 O) is tried.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..config import keeps
from . import grid, learn, rounding, stats, transforms
from .geometry import AttentionGeometry, LayerResult, LayerWeights
from .site import (
    Rounding,
    SiteOutcome,
    SiteTransform,
    diagonal_scaling,
    hessian,
    identity_moments,
    learned_scaling,
    merge_parts,
    round_site,
)
from .value_output import value_output


def split_qkv(layer: LayerWeights, att: AttentionGeometry) -> dict[str, torch.Tensor]:
    if att.qkv is None:
        return {r: layer.weights[getattr(att, r)] for r in ("q", "k", "v") if getattr(att, r)}
    w = layer.weights[att.qkv]
    nq, nk, _ = att.qkv_split
    return {"q": w[:, :nq], "k": w[:, nq : nq + nk], "v": w[:, nq + nk :]}


@dataclasses.dataclass
class _Attention:
    sites: dict[str, SiteOutcome]  # role -> outcome ("q", "k", "v", "o")
    error: float


def optimise_attention(layer: LayerWeights, how: Rounding, result: LayerResult, residual: stats.Moments | None):
    """Round q/k/v/o of one layer into `result`; the residual statistics after the attention sublayer."""
    att = layer.attention
    parts = split_qkv(layer, att)
    first = next(iter(parts.values()))
    key = att.qkv or att.q
    prior = identity_moments(first.shape[0], first.device) if residual is None else stats.rms_norm(residual, layer.gain(att.gain))
    x = layer.input_of(key, prior)
    h = hessian(x, layer.form_of(key, how.config.hessian))
    # The scaling is chosen by the (cheap) weighted rounding error; GPTQ then runs once.
    a, a_tags = diagonal_scaling(list(parts.values()), h, how.at(att.qkv or att.q), att.gain_foldable, "norm-diag", layer.trusted(key))
    dtype = layer.scale_dtypes[att.qkv or att.q or att.v]
    learned = learned_scaling(list(parts.values()), h, how.at(att.qkv or att.q), a, att.gain_foldable, "norm-diag", layer.trusted(key), dtype)
    if learned is None:
        best = _attention_with(layer, att, parts, x, h, a, a_tags, how)
    else:  # kept where the sublayer's sites round better with it; the V/O block is learned once, after
        best = _attention_with(layer, att, parts, x, h, a, a_tags, how, learn_vo=False)
        trial = _attention_with(layer, att, parts, x, h, *learned, how, learn_vo=False)
        if keeps(how.config, trial.error, best.error):
            best, (a, a_tags) = trial, learned
        if how.config.learned_vo_steps and "v" in parts:
            best.sites.update(value_output(layer, att, parts["v"], v_bias(layer, att), x, h, a, a_tags, how, layer.scale_dtypes[att.qkv or att.v]))
    if a is not None:
        result.gains[att.gain] = layer.gain(att.gain).to(torch.float32) * a
    names = {"q": att.q, "k": att.k, "v": att.v}
    if att.o and "o" in best.sites:
        result.sites[att.o] = best.sites["o"]
    if att.qkv:
        result.sites[att.qkv] = merge_parts([best.sites[r] for r in ("q", "k", "v")])
    else:
        for role in ("q", "k", "v"):
            if role in best.sites:
                result.sites[names[role]] = best.sites[role]

    return residual_after_attention(layer, residual, prior)  # propagated alone, as propagate_layer does


def residual_after_attention(layer: LayerWeights, residual: stats.Moments | None, x: stats.Moments | None = None):
    """The residual statistics after the attention sublayer: from the float weights alone (the
    rounding never enters), so a statistics pass gets them without optimising; `x` is the norm's
    output when the caller has it."""
    att = layer.attention
    v = split_qkv(layer, att).get("v")
    if residual is None or not (att.o and v is not None and att.head_dim and att.num_heads):
        return residual
    x = stats.rms_norm(residual, layer.gain(att.gain)) if x is None else x
    # Attention weights sum to one, so a value bias reaches o's input unchanged: it shifts the mean.
    z = stats.attention_output(stats.with_bias(stats.linear(x, v), v_bias(layer, att)), att.num_heads, att.head_dim)
    y = stats.with_bias(stats.linear(z, layer.weights[att.o]), layer.biases.get(att.o))
    return residual + stats.sublayer_output(y, layer.gain(att.post_gain), att.post_norm)


def v_bias(layer: LayerWeights, att: AttentionGeometry) -> torch.Tensor | None:
    if att.qkv:
        bias = layer.biases.get(att.qkv)
        return None if bias is None else bias[sum(att.qkv_split[:2]) :]
    return layer.biases.get(att.v)


def _attention_with(layer, att: AttentionGeometry, parts, x, h, a, tags, how: Rounding, learn_vo: bool = True) -> _Attention:
    """Everything after the choice of the norm scaling a: Q/K rotations, the V/O pair (its block
    learned where `learn_vo` and the recipe say so)."""
    names = {"q": att.q, "k": att.k, "v": att.v}
    dtype_of = lambda role: layer.scale_dtypes[att.qkv or names[role]]  # noqa: E731
    sites: dict[str, SiteOutcome] = {}
    candidates: list[tuple[tuple, list[str]]] = [((None, None), [])]  # (R_q, R_k), tags
    if how.config.qk_transform and _qk_applies(att) and "q" in parts and "k" in parts:
        candidates = _qk_candidates(parts["q"], parts["k"], h, a, att, how.at(att.qkv or att.q), dtype_of("q"))
    best = None
    for (rq, rk), qk_tags in candidates:  # the learned factors only where q and k then round better (or forced)
        trial = {role: round_site(parts[role], h, dtype_of(role), how.at(att.qkv or names[role]), SiteTransform(row=a, col=rot), tags + qk_tags)
                 for role, rot in (("q", rq), ("k", rk)) if role in parts}  # fmt: skip
        err = sum(o.error for o in trial.values())
        if best is None or err < best[0] or (how.config.force_transforms and "qk-rope-learned" in qk_tags):
            best = (err, trial)
    sites.update(best[1])
    if "v" in parts:
        sites.update(value_output(layer, att, parts["v"], v_bias(layer, att), x, h, a, tags, how, dtype_of("v"), learn_vo))
    return _Attention(sites, sum(o.error for o in sites.values()))


def _qk_applies(att: AttentionGeometry) -> bool:
    """RoPE-commuting factors exist only for half-split pairs and without per-head q/k norms."""
    return att.rope == "half" and not att.qk_norm and bool(att.head_dim and att.num_heads)


def _qk_candidates(w_q, w_k, h, a, att: AttentionGeometry, how: Rounding, dtype) -> list[tuple[tuple, list[str]]]:
    """The searched RoPE rotations, and (with learned_qk_steps) the angles learned from them."""
    angles = rope_angles(w_q, w_k, h, a, att, how)
    d, r = att.head_dim, att.rotary_dim or att.head_dim
    group = att.num_heads // (w_k.shape[1] // d)
    moved = bool(angles.any())
    out = [(_rotations(angles, group, d, r) if moved else (None, None), ["qk-rope-rotation"] if moved else [])]
    config = how.config
    if config.learned_qk_steps > 0:
        rows = SiteTransform(row=a)
        found = learn.learn_rope_angles(rows.forward(w_q), rows.forward(w_k), rows.hessian(h), how.fmt, angles, d, r,
                                        config.learned_qk_steps, config.learned_qk_lr, dtype)  # fmt: skip
        if found.moved or config.force_transforms:
            out.append((_rotations(found.value, group, d, r), ["qk-rope-learned"]))
    return out


def _rotations(angles: torch.Tensor, group: int, d: int, r: int) -> tuple:
    """(R_q, R_k): every query head takes its KV group's rotation."""
    return transforms.rope_rotation(angles.repeat_interleave(group, dim=0), d, r), transforms.rope_rotation(angles, d, r)


def rope_angles(w_q, w_k, h, a, att: AttentionGeometry, how: Rounding) -> torch.Tensor:
    """Per KV group and RoPE pair, the rotation angle (a unit complex factor) that rounds best:
    [kv, r/2], zero where no rotation pays."""
    d, heads, fmt = att.head_dim, att.num_heads, how.fmt
    r = att.rotary_dim or d
    kv = w_k.shape[1] // d
    group = heads // kv
    rows = SiteTransform(row=a)
    wq, wk = rows.forward(w_q), rows.forward(w_k)
    weight = rounding.hessian_diagonal(rows.hessian(h)).clamp(min=0.0)
    per_query = lambda ang: ang.repeat_interleave(group, dim=0)  # noqa: E731  (query head h -> group h // group)
    scores = []
    for angle in QK_ANGLES:
        phi = torch.full((kv, r // 2), angle, device=w_q.device)
        eq = _column_errors(transforms.rope_rotation(per_query(phi), d, r).right_of(wq), weight, fmt).view(heads, d)
        ek = _column_errors(transforms.rope_rotation(phi, d, r).right_of(wk), weight, fmt).view(kv, d)
        pair_q = (eq[:, : r // 2] + eq[:, r // 2 : r]).view(kv, group, r // 2).sum(1)
        scores.append(pair_q + ek[:, : r // 2] + ek[:, r // 2 : r])
    choice = torch.stack(scores).argmin(0)  # [kv, r/2]
    if how.config.force_transforms:
        choice = torch.where(choice == 0, torch.ones_like(choice), choice)
    return torch.tensor(QK_ANGLES, device=w_q.device)[choice]


QK_ANGLES = (0.0, math.pi / 8, math.pi / 4, 3 * math.pi / 8)


def _column_errors(w: torch.Tensor, row_weight: torch.Tensor, fmt) -> torch.Tensor:
    """Weighted round-to-nearest error of each column of W[K, N] -> [N]."""
    q = grid.rtn(w, fmt)
    return ((w - q.dequantize()) ** 2 * row_weight.unsqueeze(1)).sum(0)
