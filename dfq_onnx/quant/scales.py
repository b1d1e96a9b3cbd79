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
from .grid import grid_max, quantize_blocks, round_clamped, rtn_params

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


CANDIDATE_ELEMENTS = 1 << 19  # values evaluated at once across candidates: temporaries stay below the mmap threshold (memory.py)


def candidate_errors(blocks, scales, zero, qmax: int, weight, dim: int = -1) -> torch.Tensor:
    """Weighted error of rounding `blocks` [N, kb, bs] with candidate parameters [R, N, kb] -> [R, N, kb]
    (or of [kb, bs, N] row blocks with parameters [kb, N] when `dim` = 1, the axis along a block).

    The codes stay in float (the same values quantize_blocks produces), so no integer round trip.
    """
    inv = torch.where(scales != 0, 1.0 / torch.where(scales != 0, scales, 1.0), 0.0)
    zero = zero.unsqueeze(dim) if torch.is_tensor(zero) else zero
    q = round_clamped(blocks * inv.unsqueeze(dim) + zero, qmax)
    err = (blocks - (q - zero) * scales.unsqueeze(dim)) ** 2
    if weight is not None:
        err = err * weight
    return err.sum(dim)


def _best_of(blocks, candidates, qmax: int, weight):
    """Index (per block) of the candidate with the lowest error, and that error; the first wins ties.

    `candidates(lo, hi)` returns (scales, zero) for candidates lo..hi-1, stacked on a leading axis.
    """
    count = candidates.count
    step = max(1, CANDIDATE_ELEMENTS // max(blocks.numel(), 1))
    best_e = best_i = None
    for lo in range(0, count, step):
        sc, zero = candidates(lo, min(lo + step, count))
        e = candidate_errors(blocks, sc, zero, qmax, weight)
        e_min, i_min = e.min(0)
        i_min = i_min + lo
        if best_e is None:
            best_e, best_i = e_min, i_min
        else:
            better = e_min < best_e
            best_e = torch.where(better, e_min, best_e)
            best_i = torch.where(better, i_min, best_i)
    return best_i, best_e


class _Ratios:
    """Symmetric candidates: the RTN scale times each ratio, rounded to the scale dtype."""

    def __init__(self, base, ratios, scale_dtype, half):
        self.base, self.scale_dtype, self.half = base, scale_dtype, half
        self.ratios = torch.tensor(ratios, dtype=torch.float32, device=base.device)
        self.count = len(ratios)

    def scales(self, idx: torch.Tensor) -> torch.Tensor:
        return _round_scale(self.base * self.ratios[idx], self.scale_dtype)

    def __call__(self, lo, hi):
        r = self.ratios[lo:hi].view(-1, *([1] * self.base.dim()))
        return _round_scale(self.base.unsqueeze(0) * r, self.scale_dtype), self.half


def _search_symmetric(blocks, fmt, weight, scale_dtype):
    half = float(1 << (fmt.bits - 1))
    qmax = grid_max(fmt.bits)
    base, _ = rtn_params(blocks, fmt, scale_dtype)  # -signed_max / half: the RTN scale
    candidates = _Ratios(base, SYMMETRIC_RATIOS, scale_dtype, half)  # ratio 1.0 first: RTN wins ties
    idx, best_e = _best_of(blocks, candidates, qmax, weight)
    best_s = torch.where(idx == 0, base, candidates.scales(idx))
    for _ in range(REFINE_STEPS):
        q = round_clamped(blocks * _inverse(best_s).unsqueeze(-1) + half, qmax) - half
        s = _round_scale(_least_squares_scale(blocks, q, weight, best_s), scale_dtype)
        e = candidate_errors(blocks, s.unsqueeze(0), half, qmax, weight)[0]
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_e = torch.where(better, e, best_e)
    return best_s, None


def _inverse(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s != 0, 1.0 / torch.where(s != 0, s, 1.0), 0.0)


def _least_squares_scale(x, q, weight, fallback):
    """argmin_s sum w (x - q s)^2 = sum w q x / sum w q^2, per block."""
    wq = q if weight is None else q * weight
    num = (wq * x).sum(-1)
    den = (wq * q).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), fallback)


class _Ranges:
    """Asymmetric candidates: the range [min, max] shrunk on each side, scale rounded, zero point snapped."""

    def __init__(self, mn, mx, ratios, scale_dtype, qmax):
        pairs = [(a, b) for a in ratios for b in ratios if not (a == 1.0 and b == 1.0)]
        self.lo_r = torch.tensor([a for a, _ in pairs], dtype=torch.float32, device=mn.device)
        self.hi_r = torch.tensor([b for _, b in pairs], dtype=torch.float32, device=mn.device)
        self.mn, self.mx, self.scale_dtype, self.qmax = mn, mx, scale_dtype, qmax
        self.count = len(pairs)

    def params(self, lo_r, hi_r):
        lo, hi = self.mn * lo_r, self.mx * hi_r
        s = _round_scale((hi - lo) / self.qmax, self.scale_dtype)
        return s, _zero_point(lo, s, self.qmax)

    def __call__(self, a, b):
        shape = (-1, *([1] * self.mn.dim()))
        s, z = self.params(self.lo_r[a:b].view(shape), self.hi_r[a:b].view(shape))
        return s, z.to(torch.float32)


def _search_asymmetric(blocks, fmt, weight, scale_dtype):
    qmax = float(grid_max(fmt.bits))
    base_s, base_z = rtn_params(blocks, fmt, scale_dtype)
    best_e = candidate_errors(blocks, base_s.unsqueeze(0), base_z.float().unsqueeze(0), int(qmax), weight)[0]
    mn = torch.clamp(blocks.amin(-1), max=0.0)
    mx = torch.clamp(blocks.amax(-1), min=0.0)
    candidates = _Ranges(mn, mx, ASYMMETRIC_RATIOS, scale_dtype, qmax)
    idx, e = _best_of(blocks, candidates, int(qmax), weight)
    s, z = candidates.params(candidates.lo_r[idx], candidates.hi_r[idx])
    better = e < best_e  # min/max RTN is kept unless a candidate is strictly better
    best_s = torch.where(better, s, base_s)
    best_z = torch.where(better, z, base_z)
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
