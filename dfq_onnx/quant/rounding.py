"""Adaptive rounding without data: GPTQ's error feedback with a Hessian that comes from the
weights (a transform, a paired matrix or a prior), not from calibration activations.

The loss is tr((W - W_hat)^T H (W - W_hat)) for W[K, N]. Rows of W (inputs) are rounded one at
a time; each rounding error is pushed onto the rows not yet rounded through H^-1, so later rows
compensate. Scales of a block are chosen when its first row is reached, from the already
compensated weights. With a diagonal H nothing is fed back and the result is plain rounding.
"""

from __future__ import annotations

import torch

from ..config import QuantFormat
from . import grid, scales

LAZY_ROWS = 128


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: QuantFormat,
    scale_dtype: torch.dtype = torch.float32,
    search_scales: bool = True,
    damp: float = 0.01,
) -> grid.Quantized:
    """Quantize W[K, N] minimising tr(D^T H D); H is [K, K] (symmetric PSD)."""
    k, n = w.shape
    bs = fmt.block_size
    kb = -(-k // bs)
    kp = kb * bs
    wt = torch.zeros(n, kp, dtype=torch.float32, device=w.device)
    wt[:, :k] = w.t().to(torch.float32)
    hp = torch.eye(kp, dtype=torch.float64, device=w.device)
    hp[:k, :k] = h.to(torch.float64)
    diag = torch.diagonal(hp).clone()
    dead = diag <= 0
    hp[dead, dead] = 1.0
    hp += damp * float(diag[~dead].mean() if (~dead).any() else 1.0) * torch.eye(kp, dtype=torch.float64, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True).to(torch.float32)
    importance = torch.diagonal(hp).to(torch.float32)

    codes = torch.zeros(n, kp, dtype=torch.uint8, device=w.device)
    scale_out = torch.zeros(n, kb, dtype=torch.float32, device=w.device)
    zp_out = None if fmt.symmetric else torch.zeros(n, kb, dtype=torch.uint8, device=w.device)
    zero_code = 1 << (fmt.container_bits - 1)

    lazy = max(LAZY_ROWS, bs)  # a multiple of the block size: a block never spans two chunks
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        block_w = wt[:, i1:i2].clone()
        errors = torch.zeros_like(block_w)
        for i in range(i1, i2):
            col = i - i1
            if i % bs == 0:
                b = i // bs
                s, z = _group_params(block_w[:, col : col + bs], importance[i : i + bs], fmt, scale_dtype, search_scales)
                scale_out[:, b] = s
                if zp_out is not None:
                    zp_out[:, b] = z
                zero = (z.to(torch.float32) if z is not None else None)
            q = grid.quantize_blocks(block_w[:, col : col + 1], scale_out[:, b], z, fmt)[:, 0]
            codes[:, i] = q
            centre = zero if zero is not None else torch.full_like(scale_out[:, b], float(zero_code))
            deq = (q.to(torch.float32) - centre) * scale_out[:, b]
            err = (block_w[:, col] - deq) / hinv[i, i]
            block_w[:, col:] -= err.unsqueeze(1) * hinv[i, i:i2].unsqueeze(0)
            errors[:, col] = err
        wt[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return grid.Quantized(codes=codes.reshape(n, kb, bs), scales=scale_out, zero_points=zp_out, k=k, fmt=fmt)


def _group_params(group, importance, fmt, scale_dtype, search_scales):
    blocks = group.unsqueeze(1)  # [N, 1, bs]
    if search_scales:
        s, z = scales.search(blocks, fmt, importance.view(1, 1, -1), scale_dtype)
    else:
        s, z = grid.rtn_params(blocks, fmt, scale_dtype)
    return s[:, 0], (None if z is None else z[:, 0])


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None) -> float:
    """tr((W - W_hat)^T H (W - W_hat)); H None means identity, a vector means diag(H)."""
    d = (w - w_hat).to(torch.float64)
    if h is None:
        return float((d * d).sum())
    h = h.to(torch.float64)
    if h.dim() == 1:
        return float((h.unsqueeze(1) * d * d).sum())
    return float((d * (h @ d)).sum())
