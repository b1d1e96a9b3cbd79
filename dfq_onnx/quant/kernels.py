"""GPTQ's row loops compiled for the CPU (numba): the same algorithm as rounding.py's torch loops.

GPTQ rounds the rows of W[K, N] one after another, but every column of W is its own problem under
the shared H: its rows, its block scales and its error feedback never read another column. So the
compiled loops round LANES columns side by side, each a vector lane (tiles of columns spread over
the cores), where the torch loop paid Python's and torch's dispatch for a dozen tiny vector ops per
row. Scales are searched per block inside the loop (block_scales.py: scales.py's candidates, float32
arithmetic and tie rules). Sums run in another order than torch's, so an error within float32
round-off of a tie may pick the other candidate: a code or a scale in ~10^4 can differ from the
torch loops (tests/test_kernels.py bounds it).

The torch loops in rounding.py stay the reference and the path on other devices (a GPU).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .block_scales import F32, LANES, MAX_CANDIDATES, inverse, lane_params, round_clamped


@njit(cache=True, parallel=True)
def gptq_chunk(block_w, hinv, importance, bs, qmax, symmetric, code_offset, half_dtype, search,
               sym_ratios, asym_ratios, refine, codes, scales, zeros, errors):  # fmt: skip
    """Dense GPTQ on one lazy chunk of rows: block_w [N, L] (updated in place), hinv [L, L] the
    chunk's part of the upper Cholesky factor of H^-1, importance [L] the diagonal of H; fills
    codes [N, L] (container codes), scales and zero points [N, L / bs] and errors [N, L].
    One column per iteration (the dense update runs along the column's own rows)."""
    n, length = block_w.shape
    for c in prange(n):
        row = block_w[c]
        work = np.empty((5, MAX_CANDIDATES, LANES), dtype=np.float32)
        block = np.zeros((bs, LANES), dtype=np.float32)
        s, zero = np.zeros(LANES, np.float32), np.zeros(LANES, np.float32)
        for i in range(length):
            if i % bs == 0:
                block[:, 0] = row[i : i + bs]
                lane_params(block, importance[i : i + bs], 1, qmax, symmetric, half_dtype, search, sym_ratios, asym_ratios, refine,
                            work, s, zero)  # fmt: skip
                scales[c, i // bs] = s[0]
                zeros[c, i // bs] = zero[0]
            q = round_clamped(F32(row[i] * inverse(s[0]) + zero[0]), qmax)
            codes[c, i] = np.uint8(q + code_offset)
            err = F32(F32(row[i] - F32((q - zero[0]) * s[0])) / hinv[i, i])
            for j in range(i, length):
                row[j] -= F32(err * hinv[i, j])
            errors[c, i] = err


@njit(cache=True, inline="always")
def _lane_state():
    """A tile's per-lane accumulator, scale, zero point and inverse scale, and its search scratch."""
    lanes = np.zeros((4, LANES), dtype=np.float32)
    return lanes[0], lanes[1], lanes[2], lanes[3], np.empty((5, MAX_CANDIDATES, LANES), dtype=np.float32)


@njit(cache=True, inline="always")
def _store_params(s, zero, inv, scales, zeros, c0, block, width):
    """Write the lanes' scales and zero points of quantization block `block`; keep their inverses."""
    for lane in range(width):
        scales[c0 + lane, block] = s[lane]
        zeros[c0 + lane, block] = zero[lane]
        inv[lane] = inverse(s[lane])


@njit(cache=True, parallel=True)
def gptq_low_rank(w, ratio, coef, importance, bs, qmax, symmetric, code_offset, half_dtype, search,
                  sym_ratios, asym_ratios, refine, codes, scales, zeros):  # fmt: skip
    """GPTQ for H = diag(d) + u u^T (rounding._gptq_low_rank): w [K', N] (K' whole blocks); row i of
    a column is read as w_i + ratio_i * acc, and its rounding error moves the column's accumulator
    by err * coef_i. Codes go to codes [N, K']."""
    k, n = w.shape
    for t in prange((n + LANES - 1) // LANES):
        c0 = t * LANES
        width = min(LANES, n - c0)
        acc, s, zero, inv, work = _lane_state()
        current = np.zeros((bs, LANES), dtype=np.float32)
        rounded = np.empty((bs, LANES), dtype=np.uint8)
        for b in range(k // bs):
            r0 = b * bs
            for j in range(bs):
                for lane in range(width):
                    current[j, lane] = w[r0 + j, c0 + lane] + F32(ratio[r0 + j] * acc[lane])
            lane_params(current, importance[r0 : r0 + bs], width, qmax, symmetric, half_dtype, search, sym_ratios, asym_ratios,
                        refine, work, s, zero)  # fmt: skip
            _store_params(s, zero, inv, scales, zeros, c0, b, width)
            for i in range(r0, r0 + bs):
                for lane in range(width):
                    x = w[i, c0 + lane] + F32(ratio[i] * acc[lane])
                    q = round_clamped(F32(x * inv[lane] + zero[lane]), qmax)
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
    for t in prange((n + LANES - 1) // LANES):
        c0 = t * LANES
        width = min(LANES, n - c0)
        acc, s, zero, inv, work = _lane_state()
        err = np.zeros(LANES, dtype=np.float32)
        cur = np.zeros((b, LANES), dtype=np.float32)
        group = np.zeros((bs, LANES), dtype=np.float32)
        rounded = np.empty((b, LANES), dtype=np.uint8)
        for blk in range(k // b):
            r0 = blk * b
            for j in range(b):
                for lane in range(width):
                    cur[j, lane] = w[r0 + j, c0 + lane] + F32(z[r0 + j] * acc[lane])
            for p in range(b):
                i = r0 + p
                if i % bs == 0:  # the group's rows as they stand now: this block's, then later ones
                    for r in range(bs):
                        for lane in range(width):
                            group[r, lane] = cur[p + r, lane] if p + r < b else w[i + r, c0 + lane] + F32(z[i + r] * acc[lane])
                    lane_params(group, importance[i : i + bs], width, qmax, symmetric, half_dtype, search, sym_ratios,
                                asym_ratios, refine, work, s, zero)  # fmt: skip
                    _store_params(s, zero, inv, scales, zeros, c0, i // bs, width)
                for lane in range(width):
                    x = cur[p, lane]
                    q = round_clamped(F32(x * inv[lane] + zero[lane]), qmax)
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
