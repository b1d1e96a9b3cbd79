"""One site (one linear, or a column part of one): its function-preserving transform, and its
rounding for the loss tr(D^T H D) measured in the original space.

Everything here works on a single W[K, N] and its Hessian; the layer's structure (which linears
pair, which gains fold) is the business of attention.py, mlp.py and layer.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import torch

from ..config import DiagonalPrior, HessianForm, MethodConfig, QuantFormat, Rotation, without_transforms
from . import grid, learn, rounding, scales, stats, transforms


@dataclasses.dataclass(frozen=True)
class Rounding:
    """What every site of one layer is rounded with: the format, the method's knobs, and whether the
    transformed float weights are kept (float output and the exactness check need them; otherwise
    they are dropped as soon as each site is rounded, so peak memory follows one layer)."""

    fmt: QuantFormat
    config: MethodConfig
    keep_float: bool = False
    formats: Mapping[str, QuantFormat] = dataclasses.field(default_factory=dict)  # linear -> its own format
    rng: torch.Generator | None = None  # draws the random blocks (rotation = "random"), seeded per layer
    float_sites: frozenset[str] = frozenset()  # linears written in float (excluded): a partner must not compensate them

    def untransformed(self) -> "Rounding":
        """The same rounding with every free transform off (GPTQ and the scale search kept)."""
        return dataclasses.replace(self, config=without_transforms(self.config))

    def block(self, n: int, device) -> torch.Tensor | None:
        """An n x n orthogonal block for an online or V/O transform: Hadamard, or random (seeded)."""
        if self.config.rotation == Rotation.RANDOM and self.rng is not None:
            return transforms.random_orthogonal(n, self.rng, device)
        return transforms.hadamard(n, device)

    def at(self, name: str | None) -> "Rounding":
        """How the linear `name` is rounded: its own format where a recipe override gives one."""
        fmt = self.formats.get(name) if name else None
        return self if fmt is None or fmt == self.fmt else dataclasses.replace(self, fmt=fmt)

    def stays_float(self, name: str | None) -> bool:
        return name is not None and name in self.float_sites

    def tags(self) -> list[str]:
        return (["gptq"] if self.config.gptq else []) + (["scale-search"] if self.config.scale_search else [])


@dataclasses.dataclass
class SiteOutcome:
    quantized: grid.Quantized
    error: float  # proxy of the written weights (original space)
    rtn_error: float  # proxy of round-to-nearest at the same format
    reference: float  # proxy norm of the float weights (for relative errors)
    transforms: list[str]
    float_weight: torch.Tensor | None = None  # the transformed float weight (what was rounded)
    columns: Callable[[torch.Tensor], torch.Tensor] | None = None  # b -> b C: what the output-side transform does to a bias
    sample_error: float | None = None  # `error` over every sample-th column only (round_site's `sample`)


@dataclasses.dataclass
class SiteTransform:
    """A function-preserving change of one linear's weight: W' = T^-1 L W C.

    `row` is a vector a (L = diag(a)^-1, folded into what feeds the input) or a matrix L (dense
    or a transforms.BlockDiagonal); `col` is a vector c (C = diag(c)) or a matrix C (folded into
    what reads the output); `online` is the block of x' = x blockdiag(T), computed at inference
    (an inserted op), so the weight takes T^-1 on its rows: an orthogonal b x b block repeated
    along the diagonal (T^-1 = T^T), or [K/b, b, b] general invertible blocks, one per b channels.
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

    @functools.cached_property
    def _online_blocks(self) -> transforms.BlockDiagonal:
        t = self.online
        return transforms.BlockDiagonal(t if t.dim() == 3 else t.unsqueeze(0))

    @functools.cached_property
    def _online_inverse(self) -> transforms.BlockDiagonal:
        return self._online_blocks.t() if self.online.dim() == 2 else self._online_blocks.inverse()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.row is not None:
            w = w / self.row.unsqueeze(1) if _is_vector(self.row) else _left(self.row, w)
        if self.online is not None:
            w = self._online_inverse.times(w)
        if self.col is not None:
            w = w * self.col.unsqueeze(0) if _is_vector(self.col) else _right(w, self.col)
        return w

    def backward(self, w: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """W = L^-1 T W' C^-1; `owned`: W' is the caller's temporary, which the diagonal scalings may
        overwrite (the same elementwise operation, one layer-sized buffer fewer)."""
        if self.col is not None:
            if not _is_vector(self.col):
                w = _right(w, self._col_inverse)
            else:
                c = self.col.unsqueeze(0)
                w = w.div_(c) if owned and c.dtype == w.dtype else w / c
            owned = True
        if self.online is not None:
            w = self._online_blocks.times_(w) if owned and w.is_contiguous() else self._online_blocks.times(w)
            owned = True
        if self.row is not None:
            if not _is_vector(self.row):
                w = _left(self._row_inverse, w)
            else:
                r = self.row.unsqueeze(1)
                w = w.mul_(r) if owned and r.dtype == w.dtype else w * r
        return w

    def columns(self, b: torch.Tensor) -> torch.Tensor:
        """b C for a bias b[N] added to the output: only the output-side part of the transform moves it."""
        if self.col is None:
            return b
        return b * self.col if _is_vector(self.col) else _right(b.unsqueeze(0), self.col)[0]

    def hessian(self, h):
        """H' such that tr(D'^T H' D') = tr(D^T H D) for D = backward(D') (up to column weights)."""
        if self.row is not None:
            if isinstance(h, rounding.BlockLowRank) and isinstance(self.row, transforms.BlockDiagonal) and self.row.size == h.blocks.shape[-1]:
                inv = self._row_inverse.blocks.to(h.blocks.dtype)  # per-block rows: the structure stays
                h = rounding.BlockLowRank(inv.transpose(1, 2) @ h.blocks @ inv, self._row_inverse.t().times(h.vec.unsqueeze(1))[:, 0])
            elif _is_vector(self.row) and isinstance(h, rounding.LowRank):
                h = h.scaled(self.row)
            else:
                dense = h.dense() if isinstance(h, (rounding.LowRank, rounding.BlockLowRank)) else h
                h = dense * torch.outer(self.row, self.row) if _is_vector(self.row) else _right(_left(self._row_inverse.t(), dense), self._row_inverse)
        if self.online is not None:
            h = rotated_hessian(h, self._online_blocks)
        return h


def _is_vector(m) -> bool:
    return torch.is_tensor(m) and m.dim() == 1


def _left(m, w: torch.Tensor) -> torch.Tensor:
    return m.times(w) if isinstance(m, transforms.BlockDiagonal) else m @ w


def _right(w: torch.Tensor, m) -> torch.Tensor:
    return m.right_of(w) if isinstance(m, transforms.BlockDiagonal) else w @ m


def rotated_hessian(h, t: transforms.BlockDiagonal):
    """T^T H T for T = blockdiag(t). For H = diag(d) + u u^T the diagonal part becomes b x b blocks:
    a rounding.BlockLowRank, exact at any K without a K x K matrix."""
    if not isinstance(h, rounding.LowRank):
        return t.t().times(t.t().times(h).t())  # T^T (T^T H)^T = T^T H T (H symmetric)
    k, b = h.diag.shape[0], t.size
    vec = t.t().times(h.vec.unsqueeze(1))[:, 0]
    d = h.diag.reshape(k // b, b, 1)
    blocks = t.blocks.to(d.dtype)
    per_block = blocks.transpose(1, 2) @ (d * blocks)  # [k/b, b, b]
    return rounding.BlockLowRank(per_block, vec)


def _inverse(m):
    if isinstance(m, transforms.BlockDiagonal):
        return m.inverse()
    return torch.linalg.inv(m.to(torch.float64)).to(m.dtype)


# ----------------------------------------------------------------------------- statistics -> H


def hessian(x: stats.Moments, form: HessianForm = HessianForm.DIAGONAL_PLUS_MEAN):
    """E[x^T x] of the statistics: diag(var) + m m^T (a LowRank), or dense (a K x K tensor)."""
    if form == HessianForm.DENSE and not x.diagonal:
        return (x.cov + torch.outer(x.mean, x.mean)).to(torch.float32)
    diag, vec = stats.diagonal_plus_mean(x)
    return rounding.LowRank(diag.to(torch.float32), vec.to(torch.float32))


def identity_moments(k: int, device) -> stats.Moments:
    return stats.Moments(torch.zeros(k, dtype=torch.float64, device=device), torch.ones(k, dtype=torch.float64, device=device))


# ----------------------------------------------------------------------------- rounding


NO_FEEDBACK_DAMP = 1e-12  # keeps a dead input's (zero) diagonal invertible; its weight stays ~0


def round_weight(w: torch.Tensor, h, dtype, how: Rounding) -> grid.Quantized:
    """Round W[K, N] for the loss tr(D^T H D)."""
    fmt, config = how.fmt, how.config
    if config.gptq:
        return rounding.gptq(w, h, fmt, dtype, search_scales=config.scale_search, damp=config.gptq_damp)
    if not config.scale_search:
        return grid.rtn(w, fmt, dtype)
    if w.device.type == "cpu":  # GPTQ under H's diagonal alone moves no row: the same weighted search, compiled
        diag = rounding.hessian_diagonal(h).to(torch.float32)
        return rounding.gptq(w, rounding.LowRank(diag, torch.zeros_like(diag)), fmt, dtype, search_scales=True, damp=NO_FEEDBACK_DAMP)
    blocks = grid.to_blocks(w, fmt.block_size)
    weight = grid.to_blocks(rounding.hessian_diagonal(h).reshape(-1, 1), fmt.block_size)
    s, z = scales.search(blocks, fmt, weight, dtype)
    return grid.Quantized(grid.quantize_blocks(blocks, s, z, fmt), s, z, w.shape[0], fmt)


def round_site(w, h, dtype, how: Rounding, tf: SiteTransform | None, tags, sample: int | None = None) -> SiteOutcome:
    """Round W' = tf(W) for tr(D^T H D) measured in the original space, against RTN of W.
    `sample` = s: the outcome also holds the error over columns 0, s, 2s, ... (online.py's estimate)."""
    tf = tf or SiteTransform()

    def score(quantized: grid.Quantized) -> tuple[float, float | None]:
        """(error, error over the sample) of a rounding; its W_hat is freed on return."""
        w_hat = tf.backward(quantized.dequantize(), owned=True)
        part = None if sample is None else rounding.weighted_error(w[:, ::sample], w_hat[:, ::sample], h)
        return rounding.weighted_error(w, w_hat, h, consume=True), part

    fmt = how.fmt
    rtn = grid.rtn(w, fmt, dtype)
    # Each rounding's W_hat is a temporary: scaled back and differenced in place (see weighted_error).
    rtn_err = rounding.weighted_error(w, rtn.dequantize(), h, consume=True)
    del rtn
    ref = rounding.weighted_error(w, None, h)
    wt = tf.forward(w)
    q = round_weight(wt, tf.hessian(h), dtype, how)
    fallback = grid.rtn(wt, fmt, dtype)
    float_weight = wt if how.keep_float else None
    del wt  # not held while the roundings are scored (a layer-sized buffer fewer at the peak)
    err, part = score(q)
    fallback_err, fallback_part = score(fallback)
    if fallback_err < err:
        q, err, part, tags = fallback, fallback_err, fallback_part, list(tags)
    else:
        tags = [*tags, *how.tags()]
    columns = tf.columns if tf.col is not None else None
    return SiteOutcome(q, err, rtn_err, ref, tags, float_weight=float_weight, columns=columns, sample_error=part)


def diagonal_scaling(weights, h: torch.Tensor, how: Rounding, foldable: bool, label: str, post_normed: bool):
    """A folded per-channel input scaling for a group of linears, or None; it whitens by the prior's
    importance only where config.diagonal_prior trusts the prior (`post_normed`: the layer's)."""
    config = how.config
    if not (config.diagonal and foldable):
        return None, []
    choice = transforms.search_diagonal(
        weights,
        rounding.hessian_diagonal(h).clamp(min=0.0),
        how.fmt,
        alphas=transforms.ALPHAS if trusts_prior(config, post_normed) else (0.0,),
        exclude_identity=config.force_transforms,
    )
    if choice.is_identity:
        return None, []
    return choice.a, [label]


def trusts_prior(config: MethodConfig, post_normed: bool) -> bool:
    """Whether a diagonal may whiten by the prior's per-channel values (config.diagonal_prior)."""
    return config.diagonal_prior == DiagonalPrior.ALWAYS or (config.diagonal_prior == DiagonalPrior.POST_NORM and post_normed)


def learned_scaling(weights, h, how: Rounding, start, foldable: bool, label: str, post_normed: bool, dtype):
    """The diagonal refined by gradient from the searched one (`start`, None: no scaling), or None
    where learning is off, cannot fold, would whiten by an untrusted prior, or did not lower the proxy.
    The caller keeps it only where its sites' final rounding is better with it."""
    config = how.config
    steps = config.learned_diagonal_steps
    if not (config.diagonal and foldable and steps > 0 and trusts_prior(config, post_normed)):
        return None
    found = learn.learn_diagonal(weights, h, how.fmt, start, steps, config.learned_diagonal_lr, dtype)
    if not (found.moved or config.force_transforms):
        return None
    return found.value, [f"{label}-learned"]


def merge_parts(parts: list[SiteOutcome]) -> SiteOutcome:
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
