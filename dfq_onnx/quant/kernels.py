"""GPTQ's row loops compiled for the CPU (numba): the same algorithm as rounding.py's torch loops.

GPTQ rounds the rows of W[K, N] one after another, but every column of W is its own problem under
the shared H: its rows, its block scales and its error feedback never read another column. So one
compiled loop per column (columns spread over the cores) replaces the torch loop whose every row
was a dozen tiny vector ops, each paying Python's and torch's dispatch. Scales are searched per
block inside the loop, as scales.py does for whole matrices: the same candidates, the same float32
arithmetic, the same tie rules (the first candidate wins; round half away from zero for min/max
zero points, half to even for searched ones, as torch.round). Sums run in another order than
torch's, so an error within float32 round-off of a tie may pick the other candidate: a code or a
scale in ~10^4 can differ from the torch loops (tests/test_kernels.py bounds it).

The torch loops in rounding.py stay the reference and the path on other devices (a GPU).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

F32 = np.float32
_BELOW_HALF = F32(np.nextafter(F32(0.5), F32(0.0)))  # 0.49999997: floor(x + 0.5) rounds it up


@njit(cache=True, inline="always")
def _to_scale_dtype(x, half):
    """x (float32) as stored in the model's float dtype: float16 when `half`, else unchanged
    (round to nearest even, subnormals and overflow to infinity as IEEE float16)."""
    if not half or x == 0 or not math.isfinite(x):
        return x
    _, e = math.frexp(float(x))
    quantum = max(e - 11, -24)
    r = np.rint(math.ldexp(float(x), -quantum))
    r = math.ldexp(r, quantum)
    if abs(r) > 65504.0:
        r = math.copysign(math.inf, r)
    return F32(r)


@njit(cache=True, inline="always")
def _round_clamped(x, qmax):
    """clamp(roundf(x), 0, qmax) as grid.round_clamped computes it (float32)."""
    r = np.floor(x + F32(0.5))
    if x == _BELOW_HALF:
        r -= F32(1.0)
    return min(max(r, F32(0.0)), qmax)


@njit(cache=True, inline="always")
def _inverse(s):
    return F32(F32(1.0) / s) if s != 0 else F32(0.0)


@njit(cache=True)
def _error(x, w, s, zero, qmax):
    """sum_j w_j (x_j - (clamp(round(x_j / s + zero)) - zero) s)^2 (scales.candidate_errors, one block)."""
    inv = _inverse(s)
    total = F32(0.0)
    for j in range(x.shape[0]):
        q = _round_clamped(F32(x[j] * inv + zero), qmax)
        d = F32(x[j] - F32((q - zero) * s))
        total += F32(w[j] * F32(d * d))
    return total


MAX_CANDIDATES = 64  # scales tried per block: 11 symmetric, 1 + 63 asymmetric (scales.py's grids)


@njit(cache=True)
def _errors(x, w, s, zero, inv, qmax, out):
    """out[r] = _error(x, w, s[r], zero[r], qmax) for all candidates r at once (inv[r] = _inverse(s[r])):
    each candidate's sum runs over j in _error's order, the candidates side by side in vector lanes."""
    count = s.shape[0]
    for r in range(count):
        out[r] = F32(0.0)
    for j in range(x.shape[0]):
        xj, wj = x[j], w[j]
        for r in range(count):
            q = _round_clamped(F32(xj * inv[r] + zero[r]), qmax)
            d = F32(xj - F32((q - zero[r]) * s[r]))
            out[r] += F32(wj * F32(d * d))


@njit(cache=True, inline="always")
def _first_min(e, start):
    """Index of the first smallest e[r], r >= start (the first candidate wins a tie)."""
    best = start
    for r in range(start + 1, e.shape[0]):
        if e[r] < e[best]:
            best = r
    return best


@njit(cache=True, inline="always")
def _score(x, w, qmax, work, count):
    """Errors of the `count` candidates in work[0] (scales) and work[1] (zero points), into work[3]."""
    for r in range(count):
        work[2, r] = _inverse(work[0, r])
    _errors(x, w, work[0, :count], work[1, :count], work[2, :count], qmax, work[3, :count])
    return work[3, :count]


@njit(cache=True, inline="always")
def _minmax_symmetric(x, centre, half_dtype):
    """grid.rtn_params for one symmetric block: the signed value of largest magnitude maps to -centre
    (an all-zero block keeps MLAS' signed zero: its first element)."""
    mx, mn = x.max(), x.min()
    signed_max = x[0] if (mx == 0 and mn == 0) else (mx if abs(mx) > abs(mn) else mn)
    return _to_scale_dtype(F32(-signed_max / centre), half_dtype)


@njit(cache=True)
def _search_symmetric(x, w, qmax, half_dtype, ratios, refine, work):
    """scales._search_symmetric for one block: the min/max scale times each ratio, then least squares."""
    centre = F32((qmax + 1) // 2)
    base = _minmax_symmetric(x, centre, half_dtype)
    count = ratios.shape[0]
    work[0, 0] = base
    for r in range(1, count):
        work[0, r] = _to_scale_dtype(F32(base * ratios[r]), half_dtype)
    work[1, :count] = centre
    e = _score(x, w, qmax, work, count)
    best = _first_min(e, 0)
    best_s, best_e = work[0, best], e[best]
    for _ in range(refine):
        inv = _inverse(best_s)
        num = F32(0.0)
        den = F32(0.0)
        for j in range(x.shape[0]):
            q = F32(_round_clamped(F32(x[j] * inv + centre), qmax) - centre)
            wq = F32(w[j] * q)
            num += F32(wq * x[j])
            den += F32(wq * q)
        s = F32(num / den) if den > 0 else best_s
        s = _to_scale_dtype(s, half_dtype)
        e = _error(x, w, s, centre, qmax)
        if not e < best_e:
            break  # a step reads only the best so far: every later one would repeat this one
        best_s, best_e = s, e
    return best_s


@njit(cache=True, inline="always")
def _round_half_away(x):
    t = F32(math.trunc(x))
    return t + (F32(math.copysign(1.0, x)) if abs(x - t) >= 0.5 else F32(0.0))


@njit(cache=True)
def _minmax_asymmetric(x, qmax, half_dtype):
    """grid.rtn_params for one asymmetric block: (scale, zero point) as MLAS computes them."""
    mx, mn = x.max(), x.min()
    if mx == 0 and mn == 0:
        return F32(0.0), F32(min(max(_round_half_away(mn), 0.0), qmax))
    mn = min(mn, F32(0.0))
    mx = max(mx, F32(0.0))
    s = F32(F32(mx - mn) / qmax)
    zf = F32(F32(0.0) - F32(mn / s)) if s != 0 else mn
    return _to_scale_dtype(s, half_dtype), F32(min(max(_round_half_away(zf), 0.0), qmax))


@njit(cache=True, inline="always")
def _snap_zero(v, s, qmax, if_zero):
    """clamp(round half to even(v / s), 0, qmax), `if_zero` / 1 where s == 0 (as scales.py divides)."""
    z = F32(v / s) if s != 0 else if_zero
    return min(max(np.rint(z), F32(0.0)), qmax)


@njit(cache=True)
def _search_asymmetric(x, w, qmax, half_dtype, ratios, refine, work):
    """scales._search_asymmetric for one block: shrunk ranges on each side, then least squares."""
    work[0, 0], work[1, 0] = _minmax_asymmetric(x, qmax, half_dtype)
    mn = min(x.min(), F32(0.0))
    mx = max(x.max(), F32(0.0))
    count = 1
    for a in range(ratios.shape[0]):
        for b in range(ratios.shape[0]):
            if a == 0 and b == 0:
                continue
            lo, hi = F32(mn * ratios[a]), F32(mx * ratios[b])
            s = _to_scale_dtype(F32(F32(hi - lo) / qmax), half_dtype)
            work[0, count], work[1, count] = s, _snap_zero(-lo, s, qmax, F32(0.0))
            count += 1
    e = _score(x, w, qmax, work, count)
    best = _first_min(e, 1)  # the best shrunk range replaces min/max only when strictly better
    best = best if e[best] < e[0] else 0
    best_s, best_z, best_e = work[0, best], work[1, best], e[best]
    n = x.shape[0]
    for _ in range(refine):
        inv = _inverse(best_s)
        sw = sq = sqq = sx = sqx = F32(0.0)
        for j in range(n):
            q = _round_clamped(F32(x[j] * inv + best_z), qmax)
            sw += w[j]
            sq += F32(w[j] * q)
            sqq += F32(F32(w[j] * q) * q)
            sx += F32(w[j] * x[j])
            sqx += F32(F32(w[j] * q) * x[j])
        det = F32(F32(sw * sqq) - F32(sq * sq))
        if abs(det) > F32(1e-12) * max(F32(sw * sqq), F32(1e-30)):
            s = F32(F32(F32(sw * sqx) - F32(sq * sx)) / det)
            m = F32(F32(F32(sqq * sx) - F32(sq * sqx)) / det)
        else:
            s, m = best_s, F32(0.0)
        s = _to_scale_dtype(s, half_dtype)
        z = _snap_zero(-m, s, qmax, -m)
        # With the zero point fixed to an integer, the scale has its own least-squares optimum.
        num = den = F32(0.0)
        for j in range(n):
            q = F32(_round_clamped(F32(x[j] * inv + best_z), qmax) - z)
            wq = F32(w[j] * q)
            num += F32(wq * x[j])
            den += F32(wq * q)
        s = _to_scale_dtype(F32(num / den) if den > 0 else s, half_dtype)
        e = _error(x, w, s, z, qmax)
        if not e < best_e:
            break  # a step reads only the best so far: every later one would repeat this one
        best_s, best_z, best_e = s, z, e
    return best_s, best_z


@njit(cache=True)
def _block_params(x, w, qmax, symmetric, half_dtype, search, sym_ratios, asym_ratios, refine, work):
    """(scale, zero point on the grid) of one block: searched, or min/max (grid.rtn_params).
    `work`: float32 [4, MAX_CANDIDATES] scratch of the caller's thread."""
    if symmetric:
        centre = F32((qmax + 1) // 2)
        if search:
            return _search_symmetric(x, w, qmax, half_dtype, sym_ratios, refine, work), centre
        return _minmax_symmetric(x, centre, half_dtype), centre
    if search:
        return _search_asymmetric(x, w, qmax, half_dtype, asym_ratios, refine, work)
    return _minmax_asymmetric(x, qmax, half_dtype)


@njit(cache=True, parallel=True)
def gptq_chunk(block_w, hinv, importance, bs, qmax, symmetric, code_offset, half_dtype, search,
               sym_ratios, asym_ratios, refine, codes, scales, zeros, errors):  # fmt: skip
    """Dense GPTQ on one lazy chunk of rows: block_w [N, L] (updated in place), hinv [L, L] the
    chunk's part of the upper Cholesky factor of H^-1, importance [L] the diagonal of H; fills
    codes [N, L] (container codes), scales and zero points [N, L / bs] and errors [N, L]."""
    n, length = block_w.shape
    for c in prange(n):
        row = block_w[c]
        work = np.empty((4, MAX_CANDIDATES), dtype=np.float32)
        s = F32(0.0)
        zero = F32(0.0)
        for i in range(length):
            if i % bs == 0:
                s, zero = _block_params(row[i : i + bs].copy(), importance[i : i + bs], qmax, symmetric, half_dtype, search,
                                        sym_ratios, asym_ratios, refine, work)  # fmt: skip
                scales[c, i // bs] = s
                zeros[c, i // bs] = zero
            inv = _inverse(s)
            q = _round_clamped(F32(row[i] * inv + zero), qmax)
            codes[c, i] = np.uint8(q + code_offset)
            err = F32(F32(row[i] - F32((q - zero) * s)) / hinv[i, i])
            for j in range(i, length):
                row[j] -= F32(err * hinv[i, j])
            errors[c, i] = err


_LANES = 16  # columns rounded side by side: each a vector lane, so one column's chain of dependent
# float ops (its error feeds the next row) no longer bounds the loop


@njit(cache=True, parallel=True)
def gptq_low_rank(w, ratio, coef, importance, bs, qmax, symmetric, code_offset, half_dtype, search,
                  sym_ratios, asym_ratios, refine, codes, scales, zeros):  # fmt: skip
    """GPTQ for H = diag(d) + u u^T (rounding._gptq_low_rank): w [K', N] (K' whole blocks); row i of
    a column is read as w_i + ratio_i * acc, and its rounding error moves the column's accumulator
    by err * coef_i. Codes go to codes [N, K']."""
    k, n = w.shape
    for t in prange((n + _LANES - 1) // _LANES):
        c0 = t * _LANES
        width = min(_LANES, n - c0)
        acc = np.zeros(_LANES, dtype=np.float32)
        s, zero, inv = np.zeros(_LANES, np.float32), np.zeros(_LANES, np.float32), np.zeros(_LANES, np.float32)
        current = np.empty((_LANES, bs), dtype=np.float32)
        rounded = np.empty((bs, _LANES), dtype=np.uint8)
        work = np.empty((4, MAX_CANDIDATES), dtype=np.float32)
        for b in range(k // bs):
            r0 = b * bs
            for lane in range(width):
                for j in range(bs):
                    current[lane, j] = w[r0 + j, c0 + lane] + F32(ratio[r0 + j] * acc[lane])
                s[lane], zero[lane] = _block_params(current[lane], importance[r0 : r0 + bs], qmax, symmetric, half_dtype, search,
                                                    sym_ratios, asym_ratios, refine, work)  # fmt: skip
                scales[c0 + lane, b] = s[lane]
                zeros[c0 + lane, b] = zero[lane]
                inv[lane] = _inverse(s[lane])
            for i in range(r0, r0 + bs):
                for lane in range(width):
                    x = w[i, c0 + lane] + F32(ratio[i] * acc[lane])
                    q = _round_clamped(F32(x * inv[lane] + zero[lane]), qmax)
                    rounded[i - r0, lane] = np.uint8(q + code_offset)
                    acc[lane] += F32(F32(x - F32((q - zero[lane]) * s[lane])) * coef[i])
            for lane in range(width):
                codes[c0 + lane, r0 : r0 + bs] = rounded[:, lane]


@njit(cache=True, parallel=True)
def gptq_block_low_rank(w, z, feedback, g, importance, b, bs, qmax, symmetric, code_offset, half_dtype, search,
                        sym_ratios, asym_ratios, refine, codes, scales, zeros):  # fmt: skip
    """GPTQ for H = blockdiag(B_0, B_1, ...) + u u^T (b x b blocks; rounding.BlockLowRank), w [K, N]:
    inside a block row p's error moves the later rows j of the block by feedback[block, p, j]; across
    blocks every row j is read as w_j + z_j * acc and row i's error moves acc by -err * g_i."""
    k, n = w.shape
    for t in prange((n + _LANES - 1) // _LANES):
        c0 = t * _LANES
        width = min(_LANES, n - c0)
        acc = np.zeros(_LANES, dtype=np.float32)
        s, zero, inv = np.zeros(_LANES, np.float32), np.zeros(_LANES, np.float32), np.zeros(_LANES, np.float32)
        err = np.zeros(_LANES, dtype=np.float32)
        cur = np.empty((b, _LANES), dtype=np.float32)
        group = np.empty((_LANES, bs), dtype=np.float32)
        rounded = np.empty((b, _LANES), dtype=np.uint8)
        work = np.empty((4, MAX_CANDIDATES), dtype=np.float32)
        for blk in range(k // b):
            r0 = blk * b
            for j in range(b):
                for lane in range(width):
                    cur[j, lane] = w[r0 + j, c0 + lane] + F32(z[r0 + j] * acc[lane])
            for p in range(b):
                i = r0 + p
                if i % bs == 0:  # the group's rows as they stand now: this block's, then later ones
                    for lane in range(width):
                        for r in range(bs):
                            group[lane, r] = cur[p + r, lane] if p + r < b else w[i + r, c0 + lane] + F32(z[i + r] * acc[lane])
                        s[lane], zero[lane] = _block_params(group[lane], importance[i : i + bs], qmax, symmetric, half_dtype,
                                                            search, sym_ratios, asym_ratios, refine, work)  # fmt: skip
                        scales[c0 + lane, i // bs] = s[lane]
                        zeros[c0 + lane, i // bs] = zero[lane]
                        inv[lane] = _inverse(s[lane])
                for lane in range(width):
                    x = cur[p, lane]
                    q = _round_clamped(F32(x * inv[lane] + zero[lane]), qmax)
                    rounded[p, lane] = np.uint8(q + code_offset)
                    err[lane] = F32(x - F32((q - zero[lane]) * s[lane]))
                for j in range(p + 1, b):
                    f = feedback[blk, p, j]
                    for lane in range(width):
                        cur[j, lane] -= F32(err[lane] * f)
                for lane in range(width):
                    acc[lane] -= F32(err[lane] * g[i])
            for lane in range(width):
                codes[c0 + lane, r0 : r0 + b] = rounded[:, lane]
