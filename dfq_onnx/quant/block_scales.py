"""scales.py's per-block scales compiled for the CPU (numba), for up to LANES blocks side by side.

The GPTQ loops (kernels.py) round LANES columns at once, each a vector lane, and need one block's
scale and zero point per column whenever a quantization block starts. Every lane runs scales.py's
algorithm with its float32 arithmetic and tie rules (the first candidate wins; round half away
from zero for min/max zero points, half to even for searched ones, as torch.round): min/max, then
each candidate scaled from it, then least-squares refinement. Each candidate's error is summed over
the block in order, as one block alone would sum it; the candidates and lanes sit side by side in
the inner loops, which the compiler vectorises.

Blocks are x[bs, LANES] (row j of the block, one column per lane); `width` lanes are live.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

F32 = np.float32
_BELOW_HALF = F32(np.nextafter(F32(0.5), F32(0.0)))  # 0.49999997: floor(x + 0.5) rounds it up
LANES = 16
MAX_CANDIDATES = 64  # scales tried per block: 11 symmetric, 1 + 63 asymmetric (scales.py's grids)


_HALF_SUBNORMAL = F32(2.0**-14)  # below it float16 holds multiples of 2^-24


@njit(cache=True, inline="always")
def to_scale_dtype(x, half):
    """x (float32) as stored in the model's float dtype: float16 when `half`, else unchanged (round
    to nearest even, subnormals and overflow to infinity as IEEE float16, as numpy casts): the
    mantissa rounded to float16's 10 bits on the float32 bit pattern, subnormals on their grid."""
    if not half or x == 0 or not math.isfinite(x):
        return x
    if abs(x) < _HALF_SUBNORMAL:
        return F32(F32(np.rint(F32(x * F32(2.0**24)))) * F32(2.0**-24))
    u = F32(x).view(np.uint32)
    r = np.uint32((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)).view(np.float32)
    return F32(math.copysign(math.inf, x)) if abs(r) > F32(65504.0) else r


@njit(cache=True, inline="always")
def round_clamped(x, qmax):
    """clamp(roundf(x), 0, qmax) as grid.round_clamped computes it (float32)."""
    r = np.floor(x + F32(0.5))
    if x == _BELOW_HALF:
        r -= F32(1.0)
    return min(max(r, F32(0.0)), qmax)


@njit(cache=True, inline="always")
def inverse(s):
    return F32(F32(1.0) / s) if s != 0 else F32(0.0)


@njit(cache=True, inline="always")
def _round_half_away(x):
    t = F32(math.trunc(x))
    return t + (F32(math.copysign(1.0, x)) if abs(x - t) >= 0.5 else F32(0.0))


@njit(cache=True, inline="always")
def range_params(mx, mn, first, symmetric, qmax, half_dtype):
    """grid.rtn_params of one block from its largest and smallest value and its first one: (scale,
    zero point) as MLAS computes them. Symmetric: the signed value of largest magnitude maps to
    -centre (an all-zero block keeps MLAS' signed zero: its first element)."""
    if symmetric:
        signed_max = first if (mx == 0 and mn == 0) else (mx if abs(mx) > abs(mn) else mn)
        centre = F32((qmax + 1) // 2)
        return to_scale_dtype(F32(-signed_max / centre), half_dtype), centre
    if mx == 0 and mn == 0:
        return F32(0.0), F32(min(max(_round_half_away(mn), 0.0), qmax))
    mn = min(mn, F32(0.0))
    mx = max(mx, F32(0.0))
    s = F32(F32(mx - mn) / qmax)
    zf = F32(F32(0.0) - F32(mn / s)) if s != 0 else mn
    return to_scale_dtype(s, half_dtype), F32(min(max(_round_half_away(zf), 0.0), qmax))


@njit(cache=True, inline="always")
def minmax_symmetric(x, centre, half_dtype):
    """grid.rtn_params for one symmetric block x: its scale."""
    return range_params(x.max(), x.min(), x[0], True, F32(2 * centre - 1), half_dtype)[0]


@njit(cache=True)
def minmax_asymmetric(x, qmax, half_dtype):
    """grid.rtn_params for one asymmetric block x: (scale, zero point)."""
    return range_params(x.max(), x.min(), x[0], False, qmax, half_dtype)


@njit(cache=True, inline="always")
def _snap_zero(v, s, qmax, if_zero):
    """clamp(round half to even(v / s), 0, qmax), `if_zero` / 1 where s == 0 (as scales.py divides)."""
    z = F32(v / s) if s != 0 else if_zero
    return min(max(np.rint(z), F32(0.0)), qmax)


@njit(cache=True)
def _errors(x, w, width, count, s, zero, inv, qmax, out):
    """out[r, l] = sum_j w_j (x[j, l] - (clamp(round(x[j, l] inv[r, l] + zero[r, l])) - zero[r, l]) s[r, l])^2
    (scales.candidate_errors) for candidates r < count of lanes l < width, each sum in j order."""
    for r in range(count):
        for lane in range(width):
            out[r, lane] = F32(0.0)
    for j in range(x.shape[0]):
        wj = w[j]
        for r in range(count):
            for lane in range(width):
                xj = x[j, lane]
                q = round_clamped(F32(xj * inv[r, lane] + zero[r, lane]), qmax)
                d = F32(xj - F32((q - zero[r, lane]) * s[r, lane]))
                out[r, lane] += F32(wj * F32(d * d))


@njit(cache=True)
def _score(x, w, width, count, qmax, work):
    """Errors of candidates work[0] (scales), work[1] (zero points) into work[3] (work[2]: 1 / scale)."""
    for r in range(count):
        for lane in range(width):
            work[2, r, lane] = inverse(work[0, r, lane])
    _errors(x, w, width, count, work[0], work[1], work[2], qmax, work[3])


@njit(cache=True, inline="always")
def _first_min(e, lane, start, stop):
    """The first r in [start, stop) with the smallest e[r, lane] (the first candidate wins a tie)."""
    best = start
    for r in range(start + 1, stop):
        if e[r, lane] < e[best, lane]:
            best = r
    return best


@njit(cache=True, inline="always")
def _keep_if_better(work, width, best_s, best_z, best_e):
    """Take each lane's refined candidate (work[:, 0]) where it is strictly better; False when no
    lane took one (a step reads only the best so far, so every later step would repeat this one)."""
    moved = False
    for lane in range(width):
        if work[3, 0, lane] < best_e[lane]:
            best_s[lane], best_z[lane], best_e[lane] = work[0, 0, lane], work[1, 0, lane], work[3, 0, lane]
            moved = True
    return moved


@njit(cache=True)
def _search_symmetric(x, w, width, qmax, half_dtype, ratios, refine, work, best_s, best_z, best_e):
    """scales._search_symmetric per lane: the min/max scale times each ratio, then least squares."""
    centre = F32((qmax + 1) // 2)
    count = ratios.shape[0]
    for lane in range(width):
        base = minmax_symmetric(x[:, lane], centre, half_dtype)
        work[0, 0, lane] = base
        for r in range(1, count):
            work[0, r, lane] = to_scale_dtype(F32(base * ratios[r]), half_dtype)
        work[1, :count, lane] = centre
    _score(x, w, width, count, qmax, work)
    for lane in range(width):
        best = _first_min(work[3], lane, 0, count)
        best_s[lane], best_z[lane], best_e[lane] = work[0, best, lane], centre, work[3, best, lane]
    num, den = work[4, 0], work[4, 1]
    for _ in range(refine):
        num[:width] = F32(0.0)
        den[:width] = F32(0.0)
        for lane in range(width):
            work[2, 0, lane] = inverse(best_s[lane])
        for j in range(x.shape[0]):
            for lane in range(width):
                q = F32(round_clamped(F32(x[j, lane] * work[2, 0, lane] + centre), qmax) - centre)
                wq = F32(w[j] * q)
                num[lane] += F32(wq * x[j, lane])
                den[lane] += F32(wq * q)
        for lane in range(width):
            work[0, 0, lane] = to_scale_dtype(F32(num[lane] / den[lane]) if den[lane] > 0 else best_s[lane], half_dtype)
            work[1, 0, lane] = centre
        _score(x, w, width, 1, qmax, work)
        if not _keep_if_better(work, width, best_s, best_z, best_e):
            break


@njit(cache=True)
def _search_asymmetric(x, w, width, qmax, half_dtype, ratios, refine, work, best_s, best_z, best_e):
    """scales._search_asymmetric per lane: shrunk ranges on each side, then least squares."""
    count = 1
    for lane in range(width):
        xl = x[:, lane]
        work[0, 0, lane], work[1, 0, lane] = minmax_asymmetric(xl, qmax, half_dtype)
        mn = min(xl.min(), F32(0.0))
        mx = max(xl.max(), F32(0.0))
        count = 1
        for a in range(ratios.shape[0]):
            for b in range(ratios.shape[0]):
                if a == 0 and b == 0:
                    continue
                lo, hi = F32(mn * ratios[a]), F32(mx * ratios[b])
                s = to_scale_dtype(F32(F32(hi - lo) / qmax), half_dtype)
                work[0, count, lane], work[1, count, lane] = s, _snap_zero(-lo, s, qmax, F32(0.0))
                count += 1
    _score(x, w, width, count, qmax, work)
    for lane in range(width):
        best = _first_min(work[3], lane, 1, count)  # the best shrunk range replaces min/max only when strictly better
        best = best if work[3, best, lane] < work[3, 0, lane] else 0
        best_s[lane], best_z[lane], best_e[lane] = work[0, best, lane], work[1, best, lane], work[3, best, lane]
    sums = work[4, :5]  # sw, sq, sqq, sx, sqx per lane
    for _ in range(refine):
        sums[:, :width] = F32(0.0)
        for lane in range(width):
            work[2, 0, lane] = inverse(best_s[lane])
        for j in range(x.shape[0]):
            for lane in range(width):
                xj = x[j, lane]
                q = round_clamped(F32(xj * work[2, 0, lane] + best_z[lane]), qmax)
                sums[0, lane] += w[j]
                sums[1, lane] += F32(w[j] * q)
                sums[2, lane] += F32(F32(w[j] * q) * q)
                sums[3, lane] += F32(w[j] * xj)
                sums[4, lane] += F32(F32(w[j] * q) * xj)
        for lane in range(width):
            sw, sq, sqq, sx, sqx = sums[0, lane], sums[1, lane], sums[2, lane], sums[3, lane], sums[4, lane]
            det = F32(F32(sw * sqq) - F32(sq * sq))
            if abs(det) > F32(1e-12) * max(F32(sw * sqq), F32(1e-30)):
                s = F32(F32(F32(sw * sqx) - F32(sq * sx)) / det)
                m = F32(F32(F32(sqq * sx) - F32(sq * sqx)) / det)
            else:
                s, m = best_s[lane], F32(0.0)
            work[0, 0, lane] = to_scale_dtype(s, half_dtype)
            work[1, 0, lane] = _snap_zero(-m, work[0, 0, lane], qmax, -m)
        # With the zero point fixed to an integer, the scale has its own least-squares optimum.
        num, den = work[4, 5], work[4, 6]
        num[:width] = F32(0.0)
        den[:width] = F32(0.0)
        for j in range(x.shape[0]):
            for lane in range(width):
                q = F32(round_clamped(F32(x[j, lane] * work[2, 0, lane] + best_z[lane]), qmax) - work[1, 0, lane])
                wq = F32(w[j] * q)
                num[lane] += F32(wq * x[j, lane])
                den[lane] += F32(wq * q)
        for lane in range(width):
            work[0, 0, lane] = to_scale_dtype(F32(num[lane] / den[lane]) if den[lane] > 0 else work[0, 0, lane], half_dtype)
        _score(x, w, width, 1, qmax, work)
        if not _keep_if_better(work, width, best_s, best_z, best_e):
            break


@njit(cache=True)
def lane_params(x, w, width, qmax, symmetric, half_dtype, search, sym_ratios, asym_ratios, refine, work, s_out, z_out):
    """(scale, zero point on the grid) of each lane's block x[:, lane] into s_out, z_out: searched,
    or min/max (grid.rtn_params). `work`: float32 [5, MAX_CANDIDATES, LANES], the thread's scratch."""
    if symmetric:
        centre = F32((qmax + 1) // 2)
        if search:
            _search_symmetric(x, w, width, qmax, half_dtype, sym_ratios, refine, work, s_out, z_out, work[4, 7])
            return
        for lane in range(width):
            s_out[lane], z_out[lane] = minmax_symmetric(x[:, lane], centre, half_dtype), centre
        return
    if search:
        _search_asymmetric(x, w, width, qmax, half_dtype, asym_ratios, refine, work, s_out, z_out, work[4, 7])
        return
    for lane in range(width):
        s_out[lane], z_out[lane] = minmax_asymmetric(x[:, lane], qmax, half_dtype)
