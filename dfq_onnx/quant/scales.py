"""Per-block scale (and zero point) search minimising the (weighted) proxy instead of min/max.

For every block the search tries clipped ranges, keeps the one with the lowest weighted squared
error after real rounding, then refines the scale (and the integer zero point) by least squares
on the chosen codes. Min/max round-to-nearest is always among the candidates and a block only
moves away from it when its error drops, so the result is never worse than round-to-nearest.

All blocks of a matrix are processed at once: blocks are [N, k_blocks, block_size] tensors and
`weight` (the per-element importance, e.g. a diagonal input-covariance prior) broadcasts to them.
"""

from __future__ import annotations

import torch

from ..config import QuantFormat
from .grid import grid_max, quantize_blocks, rtn_params

SYMMETRIC_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5 (least squares refines between)
ASYMMETRIC_RATIOS = tuple(1.0 - 0.05 * i for i in range(8))  # 1.0 .. 0.65 on each side
REFINE_STEPS = 3


def block_error(blocks: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor, weight) -> torch.Tensor:
    """Weighted squared error of each block: sum w (x - (q - z) s)^2 -> [N, k_blocks]."""
    deq = (codes.to(blocks.dtype) - zero.unsqueeze(-1)) * scales.unsqueeze(-1)
    err = (blocks - deq) ** 2
    if weight is not None:
        err = err * weight
    return err.sum(-1)


def _zero(fmt: QuantFormat, zero_points: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if zero_points is None:
        return torch.full_like(like, float(1 << (fmt.bits - 1)))
    return zero_points.to(like.dtype)


def _codes(blocks, scales, zero_points, fmt):
    """Grid codes (not container codes) for given parameters."""
    sym_fmt = QuantFormat(fmt.bits, fmt.block_size, fmt.symmetric)
    q = quantize_blocks(blocks, scales, zero_points, sym_fmt)
    if zero_points is None and fmt.container_bits != fmt.bits:
        q = q - ((1 << (fmt.container_bits - 1)) - (1 << (fmt.bits - 1)))
    return q


def search(
    blocks: torch.Tensor,
    fmt: QuantFormat,
    weight: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Best scales (and zero points) per block; float32 scales representable in `scale_dtype`."""
    if fmt.symmetric:
        return _search_symmetric(blocks, fmt, weight, scale_dtype)
    return _search_asymmetric(blocks, fmt, weight, scale_dtype)


def _round_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return s.to(dtype).to(torch.float32)


def _search_symmetric(blocks, fmt, weight, scale_dtype):
    half = float(1 << (fmt.bits - 1))
    base, _ = rtn_params(blocks, fmt, scale_dtype)  # -signed_max / half: the RTN scale
    zero = torch.full_like(base, half)
    best_s = base
    best_e = block_error(blocks, _codes(blocks, base, None, fmt), base, zero, weight)
    for r in SYMMETRIC_RATIOS[1:]:
        s = _round_scale(base * r, scale_dtype)
        e = block_error(blocks, _codes(blocks, s, None, fmt), s, zero, weight)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_e = torch.where(better, e, best_e)
    for _ in range(REFINE_STEPS):
        q = _codes(blocks, best_s, None, fmt).to(blocks.dtype) - half
        s = _least_squares_scale(blocks, q, weight, best_s)
        s = _round_scale(s, scale_dtype)
        e = block_error(blocks, _codes(blocks, s, None, fmt), s, zero, weight)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_e = torch.where(better, e, best_e)
    return best_s, None


def _least_squares_scale(x, q, weight, fallback):
    """argmin_s sum w (x - q s)^2 = sum w q x / sum w q^2, per block."""
    wq = q if weight is None else q * weight
    num = (wq * x).sum(-1)
    den = (wq * q).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), fallback)


def _search_asymmetric(blocks, fmt, weight, scale_dtype):
    qmax = float(grid_max(fmt.bits))
    base_s, base_z = rtn_params(blocks, fmt, scale_dtype)
    best_s, best_z = base_s, base_z
    best_e = block_error(blocks, quantize_blocks(blocks, base_s, base_z, fmt), base_s, base_z.float(), weight)
    mn = torch.clamp(blocks.amin(-1), max=0.0)
    mx = torch.clamp(blocks.amax(-1), min=0.0)
    for r_lo in ASYMMETRIC_RATIOS:
        for r_hi in ASYMMETRIC_RATIOS:
            if r_lo == 1.0 and r_hi == 1.0:
                continue
            lo, hi = mn * r_lo, mx * r_hi
            s = _round_scale((hi - lo) / qmax, scale_dtype)
            z = _zero_point(lo, s, qmax)
            e = block_error(blocks, quantize_blocks(blocks, s, z, fmt), s, z.float(), weight)
            better = e < best_e
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_e = torch.where(better, e, best_e)
    for _ in range(REFINE_STEPS):
        q = quantize_blocks(blocks, best_s, best_z, fmt).to(blocks.dtype)
        s, m = _least_squares_affine(blocks, q, weight, best_s)
        s = _round_scale(s, scale_dtype)
        z = torch.clamp(torch.round(-m / torch.where(s != 0, s, 1.0)), 0, qmax).to(torch.uint8)
        # With the zero point fixed to an integer, the scale has its own least-squares optimum.
        s = _round_scale(_least_squares_scale(blocks, q - z.float().unsqueeze(-1), weight, s), scale_dtype)
        e = block_error(blocks, quantize_blocks(blocks, s, z, fmt), s, z.float(), weight)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_e = torch.where(better, e, best_e)
    return best_s, best_z


def _zero_point(lo, s, qmax):
    z = torch.where(s != 0, -lo / torch.where(s != 0, s, 1.0), 0.0)
    return torch.clamp(torch.round(z), 0, qmax).to(torch.uint8)


def _least_squares_affine(x, q, weight, fallback):
    """argmin_{s, m} sum w (x - (q s + m))^2 per block (m = -z s), via the 2x2 normal equations."""
    w = torch.ones_like(x) if weight is None else weight.expand_as(x)
    sw = w.sum(-1)
    sq = (w * q).sum(-1)
    sqq = (w * q * q).sum(-1)
    sx = (w * x).sum(-1)
    sqx = (w * q * x).sum(-1)
    det = sw * sqq - sq * sq
    ok = det.abs() > 1e-12 * (sw * sqq).clamp(min=1e-30)
    safe = torch.where(ok, det, 1.0)
    s = torch.where(ok, (sw * sqx - sq * sx) / safe, fallback)
    m = torch.where(ok, (sqq * sx - sq * sqx) / safe, 0.0)
    return s, m
