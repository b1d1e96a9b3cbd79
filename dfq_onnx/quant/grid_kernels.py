"""Whole-matrix passes compiled for the CPU (numba), each reading W[K, N] once in its stored layout.

`rtn` is round-to-nearest with min/max scales (ORT's DEFAULT quantizer, every site's reference);
`rtn_errors` scores a candidate diagonal scaling by the round-to-nearest error it leaves (the
diagonal search runs it ten times per activation); `dequantize` turns codes back into W_hat[K, N].
Each computes exactly what its torch form computes (grid.rtn_reference,
transforms.rounding_error_reference, grid.Quantized.dequantize_reference): the same float32
operations on every element, in the same order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .block_scales import F32, LANES, inverse, range_params, round_clamped


@njit(cache=True, inline="always")
def _lane_ranges(x, m, width, mx, mn):
    """Largest and smallest of the first m rows of each lane of x[bs, LANES]."""
    for lane in range(width):
        mx[lane] = mn[lane] = x[0, lane]
    for j in range(1, m):
        for lane in range(width):
            mx[lane] = max(mx[lane], x[j, lane])
            mn[lane] = min(mn[lane], x[j, lane])


@njit(cache=True, parallel=True)
def rtn_errors(w, divisor, weight, bs, qmax, symmetric, out):
    """out[c] = weighted squared error of round-to-nearest (min/max float32 scales, grid.rtn_params)
    of column c of W / divisor (rows divided), row j weighted by weight[j]; a short last block is
    the padded block of grid.to_row_blocks (zeros round exactly). transforms.rounding_error's sum.
    LANES columns side by side (W read along its rows), each column's sum in row order."""
    k, n = w.shape
    for t in prange((n + LANES - 1) // LANES):
        c0 = t * LANES
        width = min(LANES, n - c0)
        x = np.zeros((bs, LANES), dtype=np.float32)
        mx, mn = np.zeros(LANES, np.float32), np.zeros(LANES, np.float32)
        s, zero, inv, part = np.zeros(LANES, np.float32), np.zeros(LANES, np.float32), np.zeros(LANES, np.float32), np.zeros(LANES, np.float32)
        totals = np.zeros(LANES)
        for r0 in range(0, k, bs):
            m = min(bs, k - r0)
            for j in range(m):
                d = divisor[r0 + j]
                for lane in range(width):
                    x[j, lane] = F32(w[r0 + j, c0 + lane] / d)
            _lane_ranges(x, m, width, mx, mn)
            for lane in range(width):
                s[lane], zero[lane] = range_params(mx[lane], mn[lane], x[0, lane], symmetric, qmax, False)
                inv[lane] = inverse(s[lane])
                part[lane] = F32(0.0)
            for j in range(m):
                wj = weight[r0 + j]
                for lane in range(width):
                    q = round_clamped(F32(x[j, lane] * inv[lane] + zero[lane]), qmax)
                    d = F32(x[j, lane] - F32((q - zero[lane]) * s[lane]))
                    part[lane] += F32(wj * F32(d * d))
            for lane in range(width):
                totals[lane] += part[lane]
        for lane in range(width):
            out[c0 + lane] = totals[lane]


DEQUANTIZE_TILE = 128  # columns per task: W_hat's rows are written in runs of this many floats


@njit(cache=True, parallel=True)
def dequantize(codes, scales, zeros, out):
    """out[K, N] = (codes - zero) * scale in float32 from MatMulNBits' codes [N, k_blocks, block_size],
    scales and zero points [N, k_blocks]; rows past K (the last block's padding) are dropped. One task
    per block of rows and tile of columns, writing along out's rows (stores side by side)."""
    n, k_blocks, bs = codes.shape
    k = out.shape[0]
    tiles = (n + DEQUANTIZE_TILE - 1) // DEQUANTIZE_TILE
    for task in prange(k_blocks * tiles):
        b = task // tiles
        c0 = (task % tiles) * DEQUANTIZE_TILE
        width = min(DEQUANTIZE_TILE, n - c0)
        s = np.empty(DEQUANTIZE_TILE, np.float32)
        z = np.empty(DEQUANTIZE_TILE, np.float32)
        for c in range(width):
            s[c] = scales[c0 + c, b]
            z[c] = F32(zeros[c0 + c, b])
        for j in range(min(bs, k - b * bs)):
            row = b * bs + j
            for c in range(width):
                out[row, c0 + c] = F32(F32(F32(codes[c0 + c, b, j]) - z[c]) * s[c])


@njit(cache=True, parallel=True)
def rtn(w, qmax, symmetric, half_dtype, code_offset, codes, scales, zeros):
    """Round-to-nearest of W[K, N] (float32, any strides) into codes [N, k_blocks, block_size]
    (container codes; the last block padded with zeros, as grid.to_blocks pads), scales and zero
    points [N, k_blocks] (grid.rtn_params' min/max, fp16-representable when `half_dtype`)."""
    k, n = w.shape
    _, k_blocks, bs = codes.shape
    for t in prange((n + LANES - 1) // LANES):
        c0 = t * LANES
        width = min(LANES, n - c0)
        x = np.zeros((bs, LANES), dtype=np.float32)
        mx, mn = np.zeros(LANES, np.float32), np.zeros(LANES, np.float32)
        s, zero, inv = np.zeros(LANES, np.float32), np.zeros(LANES, np.float32), np.zeros(LANES, np.float32)
        rounded = np.zeros((bs, LANES), dtype=np.uint8)
        for b in range(k_blocks):
            m = min(bs, k - b * bs)
            for j in range(m):
                for lane in range(width):
                    x[j, lane] = w[b * bs + j, c0 + lane]
            x[m:] = F32(0.0)
            _lane_ranges(x, bs, width, mx, mn)
            for lane in range(width):
                s[lane], zero[lane] = range_params(mx[lane], mn[lane], x[0, lane], symmetric, qmax, half_dtype)
                inv[lane] = inverse(s[lane])
                scales[c0 + lane, b] = s[lane]
                zeros[c0 + lane, b] = np.uint8(zero[lane])
            for j in range(bs):
                for lane in range(width):
                    rounded[j, lane] = np.uint8(round_clamped(F32(x[j, lane] * inv[lane] + zero[lane]), qmax) + code_offset)
            for lane in range(width):
                codes[c0 + lane, b, :] = rounded[:, lane]
