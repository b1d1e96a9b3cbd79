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

import torch

from ..config import QuantFormat
from . import grid, rounding, scales, stats, transforms


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    prior: str = "propagated"  # "propagated" statistics, or "identity" (Sigma = I)
    scale_search: bool = True
    diagonal: bool = True
    vo_pairs: bool = True
    gptq: bool = True


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
    attn_gain: torch.Tensor | None = None
    attn_gain_foldable: bool = False
    attn_post_gain: torch.Tensor | None = None
    attn_post_norm: bool = False
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    activation: str = "gelu_tanh"
    mlp_gain: torch.Tensor | None = None
    mlp_gain_foldable: bool = False
    mlp_post_gain: torch.Tensor | None = None
    mlp_post_norm: bool = False


@dataclasses.dataclass
class SiteOutcome:
    quantized: grid.Quantized
    error: float  # proxy of the written weights (original space)
    rtn_error: float  # proxy of round-to-nearest at the same format
    reference: float  # proxy norm of the float weights (for relative errors)
    transforms: list[str]


@dataclasses.dataclass
class LayerResult:
    sites: dict[str, SiteOutcome]
    attn_gain: torch.Tensor | None = None  # new multiplicative gains to fold, when changed
    mlp_gain: torch.Tensor | None = None
    residual: stats.Moments | None = None  # the residual stream after this layer


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
            h = torch.eye(w.shape[0], device=w.device)
            result.sites[name] = _linear(w, h, fmt, layer.scale_dtypes[name], opts, None, [])
    result.residual = residual if propagate else None
    return result


# ----------------------------------------------------------------------------- one linear


def _hessian(x: stats.Moments) -> torch.Tensor:
    return stats.diagonal_plus_mean(x).to(torch.float32)


def _identity(k: int, device) -> stats.Moments:
    return stats.Moments(torch.zeros(k, dtype=torch.float64, device=device), torch.eye(k, dtype=torch.float64, device=device))


def _round(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, dtype, opts: LayerOptions) -> grid.Quantized:
    """Round W[K, N] for the loss tr(D^T H D)."""
    if opts.gptq:
        return rounding.gptq(w, h, fmt, dtype, search_scales=opts.scale_search)
    if not opts.scale_search:
        return grid.rtn(w, fmt, dtype)
    blocks = grid.to_blocks(w, fmt.block_size)
    weight = grid.to_blocks(torch.diagonal(h).reshape(-1, 1), fmt.block_size)
    s, z = scales.search(blocks, fmt, weight, dtype)
    return grid.Quantized(grid.quantize_blocks(blocks, s, z, fmt), s, z, w.shape[0], fmt)


def _linear(w, h, fmt, dtype, opts, a: torch.Tensor | None, tags, col_scale: torch.Tensor | None = None) -> SiteOutcome:
    """Round W' = diag(a)^-1 W diag(c) (a: folded input scaling, c: folded output scaling) and score
    it in the original space against round-to-nearest of W."""
    rtn = grid.rtn(w, fmt, dtype)
    rtn_err = rounding.weighted_error(w, rtn.dequantize(), h)
    ref = rounding.weighted_error(w, torch.zeros_like(w), h)
    wt, ht = w, h
    if a is not None:
        wt = wt / a.unsqueeze(1)
        ht = h * torch.outer(a, a)
    if col_scale is not None:
        wt = wt * col_scale.unsqueeze(0)
    q = _round(wt, ht, fmt, dtype, opts)
    err = rounding.weighted_error(w, _to_original(q.dequantize(), a, col_scale), h)
    fallback = grid.rtn(wt, fmt, dtype)
    fallback_err = rounding.weighted_error(w, _to_original(fallback.dequantize(), a, col_scale), h)
    if fallback_err < err:
        q, err, tags = fallback, fallback_err, [t for t in tags if "diag" in t]
    else:
        tags = [*tags, *_method_tags(opts)]
    return SiteOutcome(q, err, rtn_err, ref, tags)


def _to_original(w_hat, a, col_scale):
    if a is not None:
        w_hat = w_hat * a.unsqueeze(1)
    if col_scale is not None:
        w_hat = w_hat / col_scale.unsqueeze(0)
    return w_hat


def _method_tags(opts: LayerOptions) -> list[str]:
    return (["gptq"] if opts.gptq else []) + (["scale-search"] if opts.scale_search else [])


def _diagonal(weights, h: torch.Tensor, fmt, opts, foldable: bool, label: str):
    """A folded per-channel input scaling for a group of linears, or None."""
    if not (opts.diagonal and foldable):
        return None, []
    choice = transforms.search_diagonal(weights, torch.diagonal(h).clamp(min=0.0), fmt)
    if choice.is_identity:
        return None, []
    return choice.a, [label]


def _group(outcomes: dict[str, SiteOutcome]) -> tuple[float, float]:
    return sum(o.error for o in outcomes.values()), sum(o.rtn_error for o in outcomes.values())


# ----------------------------------------------------------------------------- attention


def _split_qkv(layer: LayerWeights) -> dict[str, torch.Tensor]:
    if layer.qkv is None:
        return {r: layer.weights[getattr(layer, r)] for r in ("q", "k", "v") if getattr(layer, r)}
    w = layer.weights[layer.qkv]
    nq, nk, _ = layer.qkv_split
    return {"q": w[:, :nq], "k": w[:, nq : nq + nk], "v": w[:, nq + nk :]}


def _attention(layer: LayerWeights, fmt, opts, result: LayerResult, residual: stats.Moments | None):
    parts = _split_qkv(layer)
    k = next(iter(parts.values())).shape[0]
    device = next(iter(parts.values())).device
    x = _identity(k, device) if residual is None else stats.rms_norm(residual, layer.attn_gain)
    h = _hessian(x)
    names = {"q": layer.q, "k": layer.k, "v": layer.v}
    dtype_of = lambda role: layer.scale_dtypes[layer.qkv or names[role]]  # noqa: E731

    def run(a, tags):
        return {role: _linear(w, h, fmt, dtype_of(role), opts, a, tags) for role, w in parts.items()}

    a, tags = _diagonal(list(parts.values()), h, fmt, opts, layer.attn_gain_foldable, "norm-diag")
    outcomes = run(a, tags)
    if a is not None and _group(outcomes)[0] >= _group(run(None, []))[0]:
        a, outcomes = None, run(None, [])
    if a is not None:
        result.attn_gain = layer.attn_gain.to(torch.float32) * a

    if layer.o:
        result.sites[layer.o] = _output_projection(layer, parts.get("v"), outcomes.get("v"), a, x, fmt, opts)
    if layer.qkv:
        result.sites[layer.qkv] = _merge(outcomes)
    else:
        for role, outcome in outcomes.items():
            result.sites[names[role]] = outcome

    if residual is None or not (layer.o and "v" in parts and layer.head_dim and layer.num_heads):
        return residual
    z = stats.attention_output(stats.linear(x, parts["v"]), layer.num_heads, layer.head_dim)
    y = stats.linear(z, layer.weights[layer.o])
    return residual + stats.sublayer_output(y, layer.attn_post_gain, layer.attn_post_norm)


def _merge(outcomes: dict[str, SiteOutcome]) -> SiteOutcome:
    """Packed q|k|v: concatenate the per-part results along N (scales are per column)."""
    parts = [outcomes[r] for r in ("q", "k", "v")]
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
    return SiteOutcome(merged, sum(p.error for p in parts), sum(p.rtn_error for p in parts), sum(p.reference for p in parts), tags)


def _output_projection(layer, w_v, v_outcome, a, x: stats.Moments, fmt, opts) -> SiteOutcome:
    """o, scored and rounded through the V/O product: E||z W_o - z^ W_o^||^2."""
    w_o = layer.weights[layer.o]
    dtype = layer.scale_dtypes[layer.o]
    d, heads = layer.head_dim, layer.num_heads
    if w_v is None or not (d and heads) or heads * d != w_o.shape[0]:
        return _linear(w_o, torch.eye(w_o.shape[0], device=w_o.device), fmt, dtype, opts, None, [])
    v_hat = v_outcome.quantized.dequantize()
    if a is not None:
        v_hat = v_hat * a.unsqueeze(1)
    v_rtn = grid.rtn(w_v, fmt, layer.scale_dtypes[layer.v or layer.qkv]).dequantize()
    pair = _PairStats(x, w_v, heads, d)
    rtn_o = grid.rtn(w_o, fmt, dtype)
    ref = pair.error(w_v, w_o, torch.zeros_like(w_v), torch.zeros_like(w_o))
    rtn_err = pair.error(w_v, w_o, v_rtn, rtn_o.dequantize())
    if opts.vo_pairs:
        # With V^ fixed, the best O solves E[z^T z^] X = E[z^T z] W_o; round it under E[z^T z^].
        h_hat, cross = pair.moments(v_hat, w_v)
        eye = torch.eye(h_hat.shape[0], device=h_hat.device, dtype=h_hat.dtype)
        target = torch.linalg.solve(h_hat + 1e-6 * h_hat.diagonal().mean() * eye, cross @ w_o.double()).float()
        q = _round(target, h_hat.float(), fmt, dtype, opts)
        tags = ["vo-pair", *_method_tags(opts)]
    else:
        h_hat, _ = pair.moments(v_hat, w_v)
        q = _round(w_o, h_hat.float(), fmt, dtype, opts)
        tags = _method_tags(opts)
    err = pair.error(w_v, w_o, v_hat, q.dequantize())
    rtn_given_v = pair.error(w_v, w_o, v_hat, rtn_o.dequantize())
    if rtn_given_v < err:  # never worse than round-to-nearest of O
        q, err, tags = rtn_o, rtn_given_v, []
    return SiteOutcome(q, err, rtn_err, ref, tags)


class _PairStats:
    """Moments of the attention output z = mix(x V) per query head, for V and a rounded V^."""

    def __init__(self, x: stats.Moments, w_v: torch.Tensor, heads: int, d: int):
        self.x, self.heads, self.d = x, heads, d
        self.h_true = self._second(w_v, w_v)

    def _second(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """E[z_a^T z_b] for z_a = mix(x A), z_b = mix(x B): block-diagonal covariance + means."""
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        cov = a64.t() @ self.x.cov @ b64
        kv = a.shape[1] // self.d
        group = self.heads // kv
        blocks, ma, mb = [], [], []
        mean_a, mean_b = self.x.mean @ a64, self.x.mean @ b64
        for h in range(self.heads):
            g = slice((h // group) * self.d, (h // group + 1) * self.d)
            blocks.append(stats.ATTENTION_CONCENTRATION * cov[g, g])
            ma.append(mean_a[g])
            mb.append(mean_b[g])
        return torch.block_diag(*blocks) + torch.outer(torch.cat(ma), torch.cat(mb))

    def moments(self, v_hat: torch.Tensor, w_v: torch.Tensor):
        return self._second(v_hat, v_hat), self._second(v_hat, w_v)

    def error(self, w_v, w_o, v_hat, o_hat) -> float:
        """E||z W_o - z^ O^||^2 = tr(W_o^T H W_o) - 2 tr(W_o^T C O^) + tr(O^T H^ O^)."""
        h_hat, cross = self.moments(v_hat, w_v)
        wo, oh = w_o.to(torch.float64), o_hat.to(torch.float64)
        total = (wo * (self.h_true @ wo)).sum() - 2 * (oh * (cross @ wo)).sum() + (oh * (h_hat @ oh)).sum()
        return max(float(total), 0.0)


# ----------------------------------------------------------------------------- MLP


def _mlp(layer: LayerWeights, fmt, opts, result: LayerResult, residual: stats.Moments | None):
    w_gate, w_up, w_down = (layer.weights[x] for x in (layer.gate, layer.up, layer.down))
    device = w_gate.device
    x = _identity(w_gate.shape[0], device) if residual is None else stats.rms_norm(residual, layer.mlp_gain)
    h = _hessian(x)
    if residual is None:
        u = _identity(w_down.shape[0], device)
    else:
        u = stats.gated_mlp_hidden(x, w_gate, w_up, layer.activation)
    hd = _hessian(u)

    def run(a, d, tags, down_tags):
        out = {
            layer.gate: _linear(w_gate, h, fmt, layer.scale_dtypes[layer.gate], opts, a, tags),
            layer.up: _linear(w_up, h, fmt, layer.scale_dtypes[layer.up], opts, a, tags + down_tags, col_scale=d),
            layer.down: _linear(w_down, hd, fmt, layer.scale_dtypes[layer.down], opts, d, down_tags),
        }
        return out

    a, tags = _diagonal([w_gate, w_up], h, fmt, opts, layer.mlp_gain_foldable, "norm-diag")
    # up's columns absorb d (W_up' = W_up diag(d)): a column scaling leaves up's rounding unchanged.
    d, down_tags = _diagonal([w_down], hd, fmt, opts, True, "up-down-diag")
    outcomes = run(a, d, tags, down_tags)
    if a is not None or d is not None:
        plain = run(None, None, [], [])
        if _group(outcomes)[0] >= _group(plain)[0]:
            a, d, outcomes = None, None, plain
    if a is not None:
        result.mlp_gain = layer.mlp_gain.to(torch.float32) * a
    result.sites.update(outcomes)

    if residual is None:
        return residual
    y = stats.linear(u, w_down)
    return residual + stats.sublayer_output(y, layer.mlp_post_gain, layer.mlp_post_norm)
