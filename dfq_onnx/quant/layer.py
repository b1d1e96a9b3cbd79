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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from ..config import QuantFormat
from . import grid, rounding, scales, stats, transforms


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    prior: str = "propagated"  # "propagated" statistics, or "identity" (Sigma = I)
    scale_search: bool = True
    diagonal: bool = True
    vo_pairs: bool = True
    vo_transform: bool = True  # try invertible T per KV head on the V/O pair
    qk_transform: bool = True  # RoPE-commuting rotations of q/k pairs (when they apply)
    gptq: bool = True
    alternations: int = 2  # V/O alternating rounding steps
    online: tuple[str, ...] = ("down", "gate_up")  # inputs that may get an online block Hadamard: "down", "gate_up"
    online_block: int = 32  # its largest block (a power of two dividing K)
    online_min_gain: float = 0.05  # kept only where it lowers its sites' proxy by at least this fraction
    force_transforms: bool = False  # take a non-identity transform wherever one applies (exactness checks)
    keep_float: bool = False  # return the transformed float weights (float output); otherwise drop them early


@dataclasses.dataclass
class LayerWeights:
    """One layer as plain tensors W[K, N] (names are opaque keys) and the gains around it."""

    weights: dict[str, torch.Tensor]
    scale_dtypes: dict[str, torch.dtype]
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_split: tuple[int, int, int] | None = None
    o: str | None = None
    head_dim: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    rope: str = "unknown"
    rotary_dim: int | None = None
    qk_norm: bool = False
    attn_gain: torch.Tensor | None = None
    attn_gain_foldable: bool = False
    attn_post_gain: torch.Tensor | None = None
    attn_post_norm: bool = False
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    gate_columns: tuple[int, int] | None = None  # gate == up: one fused linear, its halves' column ranges
    up_columns: tuple[int, int] | None = None
    activation: str = "gelu_tanh"
    mlp_gain: torch.Tensor | None = None
    mlp_gain_foldable: bool = False
    mlp_post_gain: torch.Tensor | None = None
    mlp_post_norm: bool = False
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> its output bias [N]


@dataclasses.dataclass
class SiteOutcome:
    quantized: grid.Quantized
    error: float  # proxy of the written weights (original space)
    rtn_error: float  # proxy of round-to-nearest at the same format
    reference: float  # proxy norm of the float weights (for relative errors)
    transforms: list[str]
    float_weight: torch.Tensor | None = None  # the transformed float weight (what was rounded)
    columns: Callable[[torch.Tensor], torch.Tensor] | None = None  # b -> b C: what the output-side transform does to a bias


@dataclasses.dataclass
class LayerResult:
    sites: dict[str, SiteOutcome]
    attn_gain: torch.Tensor | None = None  # new multiplicative gains to fold, when changed
    mlp_gain: torch.Tensor | None = None
    residual: stats.Moments | None = None  # the residual stream after this layer
    online: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> block T (x' = x T)
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> bias moved with its columns


def optimise_layer(
    layer: LayerWeights, fmt: QuantFormat, opts: LayerOptions, residual: stats.Moments | None = None
) -> LayerResult:
    result = LayerResult(sites={})
    done: set[str] = set()
    propagate = opts.prior == "propagated" and residual is not None
    if layer.q or layer.qkv:
        residual = _attention(layer, fmt, opts, result, residual if propagate else None)
        done.update(x for x in (layer.q, layer.k, layer.v, layer.qkv, layer.o) if x)
    if layer.gate and layer.up and layer.down:
        residual = _mlp(layer, fmt, opts, result, residual if propagate else None)
        done.update((layer.gate, layer.up, layer.down))
    for name, w in layer.weights.items():
        if name not in done:
            h = rounding.LowRank.identity(w.shape[0], w.device)
            result.sites[name] = _linear(w, h, fmt, layer.scale_dtypes[name], opts, None, [])
    result.residual = residual if propagate else None
    for name, bias in layer.biases.items():
        site = result.sites.get(name)
        if site is not None and site.columns is not None:
            result.biases[name] = site.columns(bias.to(torch.float32))
    return result


# ----------------------------------------------------------------------------- one linear


def _hessian(x: stats.Moments) -> rounding.LowRank:
    diag, vec = stats.diagonal_plus_mean(x)
    return rounding.LowRank(diag.to(torch.float32), vec.to(torch.float32))


def _identity(k: int, device) -> stats.Moments:
    return stats.Moments(torch.zeros(k, dtype=torch.float64, device=device), torch.ones(k, dtype=torch.float64, device=device))


def _round(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, dtype, opts: LayerOptions) -> grid.Quantized:
    """Round W[K, N] for the loss tr(D^T H D)."""
    if opts.gptq:
        return rounding.gptq(w, h, fmt, dtype, search_scales=opts.scale_search)
    if not opts.scale_search:
        return grid.rtn(w, fmt, dtype)
    blocks = grid.to_blocks(w, fmt.block_size)
    weight = grid.to_blocks(rounding.hessian_diagonal(h).reshape(-1, 1), fmt.block_size)
    s, z = scales.search(blocks, fmt, weight, dtype)
    return grid.Quantized(grid.quantize_blocks(blocks, s, z, fmt), s, z, w.shape[0], fmt)


@dataclasses.dataclass
class SiteTransform:
    """A function-preserving change of one linear's weight: W' = T^T L W C.

    `row` is a vector a (L = diag(a)^-1, folded into what feeds the input) or a matrix L (dense
    or a transforms.BlockDiagonal); `col` is a vector c (C = diag(c)) or a matrix C (folded into
    what reads the output); `online` is an orthogonal b x b block: x' = x blockdiag(T) is
    computed at inference (an inserted op), so the weight takes T^T on its rows.
    """

    row: torch.Tensor | transforms.BlockDiagonal | None = None
    col: torch.Tensor | transforms.BlockDiagonal | None = None
    online: torch.Tensor | None = None

    @functools.cached_property
    def _row_inverse(self):
        return _inverse(self.row)

    @functools.cached_property
    def _col_inverse(self):
        return _inverse(self.col)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.row is not None:
            w = w / self.row.unsqueeze(1) if _is_vector(self.row) else _left(self.row, w)
        if self.online is not None:
            w = transforms.block_rotate(w, self.online.t())
        if self.col is not None:
            w = w * self.col.unsqueeze(0) if _is_vector(self.col) else _right(w, self.col)
        return w

    def backward(self, w: torch.Tensor) -> torch.Tensor:
        if self.col is not None:
            w = w / self.col.unsqueeze(0) if _is_vector(self.col) else _right(w, self._col_inverse)
        if self.online is not None:
            w = transforms.block_rotate(w, self.online)
        if self.row is not None:
            w = w * self.row.unsqueeze(1) if _is_vector(self.row) else _left(self._row_inverse, w)
        return w

    def columns(self, b: torch.Tensor) -> torch.Tensor:
        """b C for a bias b[N] added to the output: only the output-side part of the transform moves it."""
        if self.col is None:
            return b
        return b * self.col if _is_vector(self.col) else _right(b.unsqueeze(0), self.col)[0]

    def hessian(self, h):
        """H' such that tr(D'^T H' D') = tr(D^T H D) for D = backward(D') (up to column weights)."""
        if self.row is not None:
            if _is_vector(self.row):
                h = h.scaled(self.row) if isinstance(h, rounding.LowRank) else h * torch.outer(self.row, self.row)
            else:
                dense = h.dense() if isinstance(h, rounding.LowRank) else h
                inv = self._row_inverse
                h = _right(_left(inv.t(), dense), inv)
        if self.online is not None:
            h = _rotated_hessian(h, self.online)
        return h


def _is_vector(m) -> bool:
    return torch.is_tensor(m) and m.dim() == 1


def _left(m, w: torch.Tensor) -> torch.Tensor:
    return m.times(w) if isinstance(m, transforms.BlockDiagonal) else m @ w


def _right(w: torch.Tensor, m) -> torch.Tensor:
    return m.right_of(w) if isinstance(m, transforms.BlockDiagonal) else w @ m


ONLINE_DENSE_LIMIT = 4096  # above this K, GPTQ under a rotated H uses its diagonal + mean direction


def _rotated_hessian(h, t: torch.Tensor):
    """T^T H T for T = blockdiag(t). For H = diag(d) + u u^T the diagonal part becomes b x b blocks:
    exact (dense) up to ONLINE_DENSE_LIMIT rows, beyond that their diagonal (the rank-1 part stays exact)."""
    if not isinstance(h, rounding.LowRank):
        return transforms.block_rotate(transforms.block_rotate(h, t.t()).t(), t.t()).t()
    k, b = h.diag.shape[0], t.shape[0]
    vec = transforms.block_rotate(h.vec.unsqueeze(1), t.t())[:, 0]
    d = h.diag.reshape(k // b, b, 1)
    if k <= ONLINE_DENSE_LIMIT:
        blocks = t.t().unsqueeze(0) @ (d * t.unsqueeze(0))  # [k/b, b, b]
        return torch.block_diag(*blocks) + torch.outer(vec, vec)
    diag = ((t * t).t().unsqueeze(0) @ d).reshape(k)
    return rounding.LowRank(diag, vec)


def _inverse(m):
    if isinstance(m, transforms.BlockDiagonal):
        return m.inverse()
    return torch.linalg.inv(m.to(torch.float64)).to(m.dtype)


def _linear(w, h, fmt, dtype, opts, tf: SiteTransform | None, tags) -> SiteOutcome:
    """Round W' = tf(W) for tr(D^T H D) measured in the original space, against RTN of W."""
    tf = tf or SiteTransform()
    rtn = grid.rtn(w, fmt, dtype)
    rtn_err = rounding.weighted_error(w, rtn.dequantize(), h)
    ref = rounding.weighted_error(w, None, h)
    wt = tf.forward(w)
    q = _round(wt, tf.hessian(h), fmt, dtype, opts)
    err = rounding.weighted_error(w, tf.backward(q.dequantize()), h)
    fallback = grid.rtn(wt, fmt, dtype)
    fallback_err = rounding.weighted_error(w, tf.backward(fallback.dequantize()), h)
    if fallback_err < err:
        q, err, tags = fallback, fallback_err, list(tags)
    else:
        tags = [*tags, *_method_tags(opts)]
    columns = tf.columns if tf.col is not None else None
    return SiteOutcome(q, err, rtn_err, ref, tags, float_weight=wt if opts.keep_float else None, columns=columns)


def _method_tags(opts: LayerOptions) -> list[str]:
    return (["gptq"] if opts.gptq else []) + (["scale-search"] if opts.scale_search else [])


def _diagonal(weights, h: torch.Tensor, fmt, opts, foldable: bool, label: str):
    """A folded per-channel input scaling for a group of linears, or None."""
    if not (opts.diagonal and foldable):
        return None, []
    choice = transforms.search_diagonal(weights, rounding.hessian_diagonal(h).clamp(min=0.0), fmt, exclude_identity=opts.force_transforms)
    if choice.is_identity:
        return None, []
    return choice.a, [label]


def _try_online(outcomes: dict[str, SiteOutcome], make, k: int, device, opts: LayerOptions, result: LayerResult) -> None:
    """Replace the sites `make` rounds by their rotated versions when the rotation pays (in place)."""
    b = transforms.online_block_size(k, opts.online_block)
    if b is None:
        return
    t = transforms.hadamard(b, device)
    rotated = make(t, f"online-hadamard{b}")
    before = sum(outcomes[name].error for name in rotated)
    after = sum(o.error for o in rotated.values())
    if opts.force_transforms or after < (1.0 - opts.online_min_gain) * before:
        outcomes.update(rotated)
        result.online.update({name: t for name in rotated})


# ----------------------------------------------------------------------------- attention


def _split_qkv(layer: LayerWeights) -> dict[str, torch.Tensor]:
    if layer.qkv is None:
        return {r: layer.weights[getattr(layer, r)] for r in ("q", "k", "v") if getattr(layer, r)}
    w = layer.weights[layer.qkv]
    nq, nk, _ = layer.qkv_split
    return {"q": w[:, :nq], "k": w[:, nq : nq + nk], "v": w[:, nq + nk :]}


@dataclasses.dataclass
class _Attention:
    sites: dict[str, SiteOutcome]  # role -> outcome ("q", "k", "v", "o")
    error: float


def _attention(layer: LayerWeights, fmt, opts, result: LayerResult, residual: stats.Moments | None):
    parts = _split_qkv(layer)
    first = next(iter(parts.values()))
    x = _identity(first.shape[0], first.device) if residual is None else stats.rms_norm(residual, layer.attn_gain)
    h = _hessian(x)
    # The scaling is chosen by the (cheap) weighted rounding error; GPTQ then runs once.
    a, a_tags = _diagonal(list(parts.values()), h, fmt, opts, layer.attn_gain_foldable, "norm-diag")
    best = _attention_with(layer, parts, x, h, a, a_tags, fmt, opts)
    if a is not None:
        result.attn_gain = layer.attn_gain.to(torch.float32) * a
    names = {"q": layer.q, "k": layer.k, "v": layer.v}
    if layer.o and "o" in best.sites:
        result.sites[layer.o] = best.sites["o"]
    if layer.qkv:
        result.sites[layer.qkv] = _merge([best.sites[r] for r in ("q", "k", "v")])
    else:
        for role in ("q", "k", "v"):
            if role in best.sites:
                result.sites[names[role]] = best.sites[role]

    if residual is None or not (layer.o and "v" in parts and layer.head_dim and layer.num_heads):
        return residual
    # Attention weights sum to one, so a value bias reaches o's input unchanged: it shifts the mean.
    z = stats.attention_output(_biased(stats.linear(x, parts["v"]), _v_bias(layer)), layer.num_heads, layer.head_dim)
    y = _biased(stats.linear(z, layer.weights[layer.o]), layer.biases.get(layer.o))
    return residual + stats.sublayer_output(y, layer.attn_post_gain, layer.attn_post_norm)


def _biased(x: stats.Moments, bias: torch.Tensor | None) -> stats.Moments:
    return x if bias is None else stats.Moments(x.mean + bias.to(x.mean.dtype), x.cov)


def _v_bias(layer: LayerWeights) -> torch.Tensor | None:
    if layer.qkv:
        bias = layer.biases.get(layer.qkv)
        return None if bias is None else bias[sum(layer.qkv_split[:2]) :]
    return layer.biases.get(layer.v)


def _attention_with(layer, parts, x, h, a, tags, fmt, opts) -> _Attention:
    """Everything after the choice of the norm scaling a: Q/K rotations, the V/O pair."""
    names = {"q": layer.q, "k": layer.k, "v": layer.v}
    dtype_of = lambda role: layer.scale_dtypes[layer.qkv or names[role]]  # noqa: E731
    sites: dict[str, SiteOutcome] = {}
    rq = rk = None
    qk_tags: list[str] = []
    if opts.qk_transform and _qk_applies(layer) and "q" in parts and "k" in parts:
        rq, rk = _rope_rotations(parts["q"], parts["k"], h, a, layer, fmt, opts)
        qk_tags = ["qk-rope-rotation"] if rq is not None else []
    for role, rot in (("q", rq), ("k", rk)):
        if role in parts:
            sites[role] = _linear(parts[role], h, fmt, dtype_of(role), opts, SiteTransform(row=a, col=rot), tags + qk_tags)
    if "v" in parts:
        sites.update(_value_output(layer, parts["v"], x, h, a, tags, fmt, opts, dtype_of("v")))
    return _Attention(sites, sum(o.error for o in sites.values()))


def _qk_applies(layer: LayerWeights) -> bool:
    """RoPE-commuting factors exist only for half-split pairs and without per-head q/k norms."""
    return layer.rope == "half" and not layer.qk_norm and bool(layer.head_dim and layer.num_heads)


def _rope_rotations(w_q, w_k, h, a, layer, fmt, opts):
    """Per KV group and RoPE pair, the rotation angle (a unit complex factor) that rounds best.

    Returns the column rotations (R_q, R_k), or (None, None) when no pair moves.
    """
    d, heads = layer.head_dim, layer.num_heads
    r = layer.rotary_dim or d
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
    if opts.force_transforms:
        choice = torch.where(choice == 0, torch.ones_like(choice), choice)
    if not bool(choice.any()):
        return None, None
    angles = torch.tensor(QK_ANGLES, device=w_q.device)[choice]
    return transforms.rope_rotation(per_query(angles), d, r), transforms.rope_rotation(angles, d, r)


QK_ANGLES = (0.0, math.pi / 8, math.pi / 4, 3 * math.pi / 8)


def _column_errors(w: torch.Tensor, row_weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Weighted round-to-nearest error of each column of W[K, N] -> [N]."""
    q = grid.rtn(w, fmt)
    return ((w - q.dequantize()) ** 2 * row_weight.unsqueeze(1)).sum(0)


def _merge(parts: list[SiteOutcome]) -> SiteOutcome:
    """One linear computed as column parts (packed q|k|v, fused gate|up), in column order:
    concatenate the per-part results along N (scales are per column)."""
    q0 = parts[0].quantized
    zps = None if q0.zero_points is None else torch.cat([p.quantized.zero_points for p in parts])
    merged = grid.Quantized(
        codes=torch.cat([p.quantized.codes for p in parts]),
        scales=torch.cat([p.quantized.scales for p in parts]),
        zero_points=zps,
        k=q0.k,
        fmt=q0.fmt,
    )
    tags = list(dict.fromkeys(t for p in parts for t in p.transforms))
    widths = [p.quantized.codes.shape[0] for p in parts]

    def columns(b: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(b, widths)
        return torch.cat([p.columns(x) if p.columns else x for p, x in zip(parts, pieces)])

    # Parts may be scored in different spaces (v through the V/O product): average relative errors.
    rel = lambda attr: sum(getattr(p, attr) / p.reference for p in parts if p.reference) / len(parts)  # noqa: E731
    return SiteOutcome(
        merged,
        rel("error"),
        rel("rtn_error"),
        1.0,
        tags,
        float_weight=None if any(p.float_weight is None for p in parts) else torch.cat([p.float_weight for p in parts], dim=1),
        columns=columns if any(p.columns for p in parts) else None,
    )


def _value_output(layer, w_v, x, h, a, tags, fmt, opts, v_dtype) -> dict[str, SiteOutcome]:
    """V and o as one pair: E||z W_o - z^ W_o^||^2, z the attention mix of x V.

    Candidates for the free V/O transform T (per KV head) are tried; for each, V is rounded,
    then O compensates the rounded V, then (alternating) V the rounded O; the best pair is kept.
    """
    d, heads = layer.head_dim, layer.num_heads
    if not layer.o:
        return {"v": _linear(w_v, h, fmt, v_dtype, opts, SiteTransform(row=a), tags)}
    w_o = layer.weights[layer.o]
    o_dtype = layer.scale_dtypes[layer.o]
    if not (d and heads) or heads * d != w_o.shape[0]:
        eye = rounding.LowRank.identity(w_o.shape[0], w_o.device)
        return {
            "v": _linear(w_v, h, fmt, v_dtype, opts, SiteTransform(row=a), tags),
            "o": _linear(w_o, eye, fmt, o_dtype, opts, None, []),
        }
    pair = _Pair(x, w_v, w_o, heads, d, _v_bias(layer))
    v_rtn = grid.rtn(w_v, fmt, v_dtype).dequantize()
    o_rtn = grid.rtn(w_o, fmt, o_dtype).dequantize()
    rtn_pair = pair.error(v_rtn, o_rtn)
    ref_pair = pair.energy

    # T per KV head is chosen by the pair error of plain rounding; the full pair rounding runs once.
    candidates = transforms.value_output_candidates(d, w_v.device) if opts.vo_transform else [("identity", None)]
    chosen = None
    for label, t in candidates:
        # One d x d block per head: V' = V blockdiag(T), O' = blockdiag(T^-1) O.
        tf_v = SiteTransform(row=a, col=None if t is None else transforms.BlockDiagonal(t.unsqueeze(0)))
        tf_o = SiteTransform(row=None if t is None else transforms.BlockDiagonal(t.unsqueeze(0)).inverse())
        cheap = pair.error(
            tf_v.backward(grid.fake_quant(tf_v.forward(w_v), fmt, v_dtype)),
            tf_o.backward(grid.fake_quant(tf_o.forward(w_o), fmt, o_dtype)),
        )
        if chosen is None or cheap < chosen[0] or (opts.force_transforms and t is not None):
            chosen = (cheap, tf_v, tf_o, [] if t is None else [f"vo-{label}"])
    _, tf_v, tf_o, extra = chosen
    qv, qo, err = _round_pair(pair, tf_v, tf_o, h, fmt, opts, v_dtype, o_dtype)
    pair_tags = ["vo-pair", *_method_tags(opts)] if opts.vo_pairs else _method_tags(opts)
    # V and O are scored as the product they compute (the proxy of a pair), both sites alike.
    return {
        "v": SiteOutcome(
            qv, err, rtn_pair, ref_pair, tags + extra + pair_tags,
            float_weight=tf_v.forward(w_v) if opts.keep_float else None,
            columns=tf_v.columns if tf_v.col is not None else None,
        ),
        "o": SiteOutcome(qo, err, rtn_pair, ref_pair, extra + pair_tags, float_weight=tf_o.forward(w_o) if opts.keep_float else None),
    }


def _round_pair(pair: "_Pair", tf_v, tf_o, h, fmt, opts, v_dtype, o_dtype):
    """Round V (for the pair's input statistics), then O given V^, then alternate; keep the best pair."""
    w_v_t = tf_v.forward(pair.w_v)
    qv = _round(w_v_t, tf_v.hessian(pair.value_hessian()), fmt, v_dtype, opts)
    best = None
    for step in range(max(1, opts.alternations)):
        v_hat = tf_v.backward(qv.dequantize())
        qo = _round_o(pair, v_hat, tf_o, fmt, opts, o_dtype)
        err = pair.error(v_hat, tf_o.backward(qo.dequantize()))
        if best is None or err < best[2]:
            best = (qv, qo, err)
        if not opts.vo_pairs or step + 1 >= opts.alternations:
            break
        # V given O^: its least-squares target, rounded under the pair's input statistics.
        target = pair.value_target(tf_o.backward(qo.dequantize()))
        qv = _round(tf_v.forward(target), tf_v.hessian(pair.value_hessian()), fmt, v_dtype, opts)
    # Round-to-nearest of the (transformed) O given the chosen V^ is always a candidate.
    qv, qo, err = best
    v_hat = tf_v.backward(qv.dequantize())
    o_plain = grid.rtn(tf_o.forward(pair.w_o), fmt, o_dtype)
    plain_err = pair.error(v_hat, tf_o.backward(o_plain.dequantize()))
    if plain_err < err:
        qo, err = o_plain, plain_err
    return qv, qo, err


def _round_o(pair: "_Pair", v_hat, tf_o: SiteTransform, fmt, opts, dtype) -> grid.Quantized:
    h_hat, cross = pair.moments_of(v_hat)
    if not opts.vo_pairs:
        return _round(tf_o.forward(pair.w_o), tf_o.hessian(h_hat.dense().float()), fmt, dtype, opts)
    # With V^ fixed the best O solves E[z^T z^] X = E[z^T z] W_o; round it under E[z^T z^].
    # The ridge keeps the solve defined for degenerate weights (an all-zero or rank-deficient V^).
    ridge = max(1e-6 * float(h_hat.diagonal().mean()), 1e-30)
    target = h_hat.solve(cross.times(pair.w_o.double()), ridge).float()
    return _round(tf_o.forward(target), tf_o.hessian(h_hat.dense().float()), fmt, dtype, opts)


@dataclasses.dataclass
class _HeadMoments:
    """E[z_a^T z_b] over the concatenated query heads: one d x d block per KV group (its query
    heads share it) plus the outer product of the means. Products never form the dense matrix."""

    blocks: torch.Tensor  # [kv, d, d] float64
    mean_a: torch.Tensor  # [heads * d]
    mean_b: torch.Tensor  # [heads * d]
    group: int  # query heads per KV head

    def times(self, w: torch.Tensor) -> torch.Tensor:
        """H @ W for W[heads * d, N] (float64)."""
        kv, d, _ = self.blocks.shape
        n = w.shape[1]
        out = (self.blocks.unsqueeze(1) @ w.reshape(kv, self.group, d, n)).reshape(-1, n)
        return out + torch.outer(self.mean_a, self.mean_b @ w)

    def quad(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """tr(A^T H B)."""
        return float((a * self.times(b)).sum())

    def diagonal(self) -> torch.Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).repeat_interleave(self.group, 0).reshape(-1) + self.mean_a * self.mean_b

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks.repeat_interleave(self.group, 0)) + torch.outer(self.mean_a, self.mean_b)

    def solve(self, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
        """(H + ridge I)^-1 RHS: per-block solves, the mean term by Sherman-Morrison."""
        kv, d, _ = self.blocks.shape
        n = rhs.shape[1]
        p = (self.blocks + ridge * torch.eye(d, dtype=self.blocks.dtype, device=self.blocks.device)).unsqueeze(1)
        p_rhs = torch.linalg.solve(p, rhs.reshape(kv, self.group, d, n)).reshape(-1, n)
        p_u = torch.linalg.solve(p, self.mean_a.reshape(kv, self.group, d, 1)).reshape(-1)
        return p_rhs - torch.outer(p_u, (self.mean_b @ p_rhs) / (1.0 + self.mean_b @ p_u))


class _Pair:
    """Statistics of the attention output z = mix(x V) + b per query head, for V and a rounded V^.

    The value bias b (Qwen 2) is not rounded, but it shifts z's mean, which weighs O's rounding:
    z W_o - z^ O^ carries b (W_o - O^).
    """

    def __init__(self, x: stats.Moments, w_v: torch.Tensor, w_o: torch.Tensor, heads: int, d: int, bias=None):
        self.x, self.w_v, self.w_o, self.heads, self.d = x, w_v, w_o, heads, d
        self.bias = torch.zeros(w_v.shape[1], dtype=torch.float64, device=w_v.device) if bias is None else bias.to(torch.float64)
        self.kv = w_v.shape[1] // d
        self.group = heads // self.kv
        self._cov = x.dense_cov()
        self._cov_v = self._cov @ w_v.to(torch.float64)  # C V: every cross term reuses it
        self._w_o = w_o.to(torch.float64)
        self.h_true = self.second(w_v, w_v)
        self.energy = self.h_true.quad(self._w_o, self._w_o)  # E||z W_o||^2: the pair's reference
        self._last: tuple | None = None  # (V^, its E[z^^T z^], E[z^^T z]) for the V^ seen last

    def value_hessian(self) -> torch.Tensor:
        """E over the mix of x^T x: what weighs V's rounding error inside the pair."""
        c = stats.ATTENTION_CONCENTRATION
        return (c * self._cov + torch.outer(self.x.mean, self.x.mean)).float()

    def second(self, a: torch.Tensor, b: torch.Tensor) -> _HeadMoments:
        """E[z_a^T z_b] for z_a = mix(x A), z_b = mix(x B): block-diagonal covariance + means."""
        a64 = a.to(torch.float64)
        cov_b = self._cov_v if b is self.w_v else self._cov @ b.to(torch.float64)
        k, kv, d = a64.shape[0], self.kv, self.d
        blocks = a64.reshape(k, kv, d).permute(1, 2, 0) @ cov_b.reshape(k, kv, d).permute(1, 0, 2)  # [kv, d, d]
        per_head = lambda m: m.reshape(kv, d).repeat_interleave(self.group, 0).reshape(-1)  # noqa: E731
        mean = self.x.mean
        return _HeadMoments(
            stats.ATTENTION_CONCENTRATION * blocks,
            per_head(mean @ a64 + self.bias),
            per_head(mean @ b.to(torch.float64) + self.bias),
            self.group,
        )

    def moments_of(self, v_hat: torch.Tensor) -> tuple[_HeadMoments, _HeadMoments]:
        """(E[z^^T z^], E[z^^T z]) for a rounded V^; kept for the next call with the same V^."""
        if self._last is None or self._last[0] is not v_hat:
            self._last = (v_hat, self.second(v_hat, v_hat), self.second(v_hat, self.w_v))
        return self._last[1], self._last[2]

    def value_target(self, o_hat: torch.Tensor) -> torch.Tensor:
        """argmin over V of the pair error for fixed O^: per KV group, V_g (sum_h W_o,h O^_h^T) (sum_h O^_h O^_h^T)^-1."""
        d = self.d
        cols = []
        for g in range(self.kv):
            heads = range(g * self.group, (g + 1) * self.group)
            wo = torch.cat([self.w_o[h * d : (h + 1) * d] for h in heads], dim=1).double()
            oh = torch.cat([o_hat[h * d : (h + 1) * d] for h in heads], dim=1).double()
            m = oh @ oh.t()
            m = m + max(1e-8 * float(m.diagonal().mean()), 1e-30) * torch.eye(d, device=m.device, dtype=m.dtype)
            cols.append(self.w_v[:, g * d : (g + 1) * d].double() @ torch.linalg.solve(m, oh @ wo.t()).t())
        return torch.cat(cols, dim=1).float()

    def error(self, v_hat, o_hat) -> float:
        """E||z W_o - z^ O^||^2 = tr(W_o^T H W_o) - 2 tr(O^^T C W_o) + tr(O^^T H^ O^)."""
        h_hat, cross = self.moments_of(v_hat)
        oh = o_hat.to(torch.float64)
        total = self.energy - 2 * float((oh * cross.times(self._w_o)).sum()) + h_hat.quad(oh, oh)
        return max(total, 0.0)


# ----------------------------------------------------------------------------- MLP


def _mlp(layer: LayerWeights, fmt, opts, result: LayerResult, residual: stats.Moments | None):
    fused = layer.gate == layer.up  # one linear holds gate and up as column ranges
    if fused:
        w = layer.weights[layer.gate]
        w_gate, w_up = (w[:, a:b] for a, b in (layer.gate_columns, layer.up_columns))
        gate_key, up_key = f"{layer.gate}#gate", f"{layer.up}#up"
    else:
        w_gate, w_up = layer.weights[layer.gate], layer.weights[layer.up]
        gate_key, up_key = layer.gate, layer.up
    w_down = layer.weights[layer.down]
    device = w_gate.device
    x = _identity(w_gate.shape[0], device) if residual is None else stats.rms_norm(residual, layer.mlp_gain)
    h = _hessian(x)
    u = _identity(w_down.shape[0], device) if residual is None else stats.gated_mlp_hidden(x, w_gate, w_up, layer.activation)
    hd = _hessian(u)
    dt = layer.scale_dtypes

    a, tags = _diagonal([w_gate, w_up], h, fmt, opts, layer.mlp_gain_foldable, "norm-diag")
    d, down_tags = _diagonal([w_down], hd, fmt, opts, True, "up-down-diag")

    # Each site's transform, with an optional online rotation `t` of its input (tagged `tag`).
    # up's columns absorb d (W_up' = W_up diag(d)); a column scaling leaves up's rounding unchanged.
    def gate_up(t=None, tag=None):
        extra = [tag] if tag else []
        return {
            gate_key: _linear(w_gate, h, fmt, dt[layer.gate], opts, SiteTransform(row=a, online=t), tags + extra),
            up_key: _linear(w_up, h, fmt, dt[layer.up], opts, SiteTransform(row=a, col=d, online=t), tags + down_tags + extra),
        }

    def down(t=None, tag=None):
        extra = [tag] if tag else []
        return {layer.down: _linear(w_down, hd, fmt, dt[layer.down], opts, SiteTransform(row=d, online=t), down_tags + extra)}

    outcomes = {**gate_up(), **down()}
    # Online rotations cost time at inference: each is kept only where it lowers its sites' proxy enough.
    for where, make, k in (("gate_up", gate_up, w_gate.shape[0]), ("down", down, w_down.shape[0])):
        if where in opts.online:
            _try_online(outcomes, make, k, device, opts, result)
    if a is not None:
        result.mlp_gain = layer.mlp_gain.to(torch.float32) * a
    if fused:
        halves = sorted([(layer.gate_columns, outcomes.pop(gate_key)), (layer.up_columns, outcomes.pop(up_key))], key=lambda p: p[0])
        outcomes[layer.gate] = _merge([outcome for _, outcome in halves])
        for key in (gate_key, up_key):
            if key in result.online:
                result.online[layer.gate] = result.online.pop(key)
    result.sites.update(outcomes)

    if residual is None:
        return residual
    y = _biased(stats.linear(u, w_down), layer.biases.get(layer.down))
    return residual + stats.sublayer_output(y, layer.mlp_post_gain, layer.mlp_post_norm)
