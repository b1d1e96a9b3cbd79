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

from .block_scales import F32, inverse, minmax_asymmetric, minmax_symmetric, round_clamped

_TILE = 16  # columns read together: one 64-byte line of each row of W[K, N]


@njit(cache=True, parallel=True)
def rtn_errors(w, divisor, weight, bs, qmax, symmetric, out):
    """out[c] = weighted squared error of round-to-nearest (min/max float32 scales, grid.rtn_params)
    of column c of W / divisor (rows divided), row j weighted by weight[j]; a short last block is
    the padded block of grid.to_row_blocks (zeros round exactly). transforms.rounding_error's sum.
    Columns go in tiles: W is read along its rows, each block's values are then contiguous."""
    k, n = w.shape
    centre = F32((qmax + 1) // 2)
    for t in prange((n + _TILE - 1) // _TILE):
        c0 = t * _TILE
        width = min(_TILE, n - c0)
        x = np.empty((_TILE, bs), dtype=np.float32)
        totals = np.zeros(_TILE)
        for r0 in range(0, k, bs):
            m = min(bs, k - r0)
            for i in range(width):
                for j in range(m):
                    x[i, j] = F32(w[r0 + j, c0 + i] / divisor[r0 + j])
            for i in range(width):
                xi = x[i, :m]
                if symmetric:
                    mx, mn = xi.max(), xi.min()
                    signed_max = xi[0] if (mx == 0 and mn == 0) else (mx if abs(mx) > abs(mn) else mn)
                    s, zero = F32(-signed_max / centre), centre
                else:
                    s, zero = minmax_asymmetric(xi, qmax, False)
                inv = inverse(s)
                part = F32(0.0)
                for j in range(m):
                    q = round_clamped(F32(xi[j] * inv + zero), qmax)
                    d = F32(xi[j] - F32((q - zero) * s))
                    part += F32(weight[r0 + j] * F32(d * d))
                totals[i] += part
        for i in range(width):
            out[c0 + i] = totals[i]


@njit(cache=True, parallel=True)
def dequantize(codes, scales, zeros, out):
    """out[K, N] = (codes - zero) * scale in float32 from MatMulNBits' codes [N, k_blocks, block_size],
    scales and zero points [N, k_blocks]; rows past K (the last block's padding) are dropped."""
    n, k_blocks, bs = codes.shape
    k = out.shape[0]
    for b in prange(k_blocks):
        rows = min(bs, k - b * bs)
        for c in range(n):
            s = scales[c, b]
            z = F32(zeros[c, b])
            for j in range(rows):
                out[b * bs + j, c] = F32(F32(F32(codes[c, b, j]) - z) * s)


@njit(cache=True, parallel=True)
def rtn(w, qmax, symmetric, half_dtype, code_offset, codes, scales, zeros):
    """Round-to-nearest of W[K, N] (float32, any strides) into codes [N, k_blocks, block_size]
    (container codes; the last block padded with zeros, as grid.to_blocks pads), scales and zero
    points [N, k_blocks] (grid.rtn_params' min/max, fp16-representable when `half_dtype`)."""
    k, n = w.shape
    _, k_blocks, bs = codes.shape
    centre = F32((qmax + 1) // 2)
    for t in prange((n + _TILE - 1) // _TILE):
        c0 = t * _TILE
        width = min(_TILE, n - c0)
        x = np.empty((_TILE, bs), dtype=np.float32)
        for b in range(k_blocks):
            m = min(bs, k - b * bs)
            for i in range(width):
                for j in range(m):
                    x[i, j] = w[b * bs + j, c0 + i]
                x[i, m:] = F32(0.0)
            for i in range(width):
                c = c0 + i
                if symmetric:
                    s, zero = minmax_symmetric(x[i], centre, half_dtype), centre
                else:
                    s, zero = minmax_asymmetric(x[i], qmax, half_dtype)
                inv = inverse(s)
                for j in range(bs):
                    codes[c, b, j] = np.uint8(round_clamped(F32(x[i, j] * inv + zero), qmax) + code_offset)
                scales[c, b] = s
                zeros[c, b] = np.uint8(zero)
