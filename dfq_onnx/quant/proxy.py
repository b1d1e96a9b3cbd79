"""Data-free proxy losses: how far a quantized weight is from the original, in the original space.

Without calibration data the input covariance is taken as the identity, so the loss of a
linear is ||W - W_hat||_F^2; for two matrices that multiply, the loss is that of their product.
A diagonal prior (e.g. the RMSNorm gain squared) weights the rows of W.
"""

from __future__ import annotations

import torch

from . import grid


def sq_error(w: torch.Tensor, w_hat: torch.Tensor, row_weight: torch.Tensor | None = None) -> float:
    """||W - W_hat||^2 (optionally tr(D^T diag(row_weight) D)), summed in float64."""
    d = (w.to(torch.float64) - w_hat.to(torch.float64)) ** 2
    if row_weight is not None:
        d = d * row_weight.to(torch.float64).unsqueeze(-1)
    return float(d.sum())


def product_sq_error(a: torch.Tensor, b: torch.Tensor, a_hat: torch.Tensor, b_hat: torch.Tensor) -> float:
    """||A B - A_hat B_hat||^2 for a pair of matrices that multiply (e.g. V and O of one head)."""
    p = a.to(torch.float64) @ b.to(torch.float64)
    p_hat = a_hat.to(torch.float64) @ b_hat.to(torch.float64)
    return float(((p - p_hat) ** 2).sum())


def quantized_errors(w: torch.Tensor, q: grid.Quantized) -> tuple[float, float]:
    """(||W||^2, ||W - W_hat||^2) for W[K, N] of any float dtype, piece by piece in W's stored layout,
    with BLAS dot products (float32 within a piece: ample for a relative error in a report).

    Padding rows dequantize to exactly zero (their codes sit on the zero point), so they add nothing.
    """
    w = w.to(q.codes.device)
    z_all = q.zero_point_values()
    ref = err = 0.0
    for kbs, ns, piece in grid.row_block_chunks(w, q.fmt.block_size):
        codes = q.codes[ns, kbs].permute(1, 2, 0).to(torch.float32)  # [k_blocks', block, N']
        z = z_all[ns, kbs].t().to(torch.float32).unsqueeze(1)
        d = torch.addcmul(piece, codes - z, q.scales[ns, kbs].t().unsqueeze(1), value=-1.0).reshape(-1)
        piece = piece.reshape(-1)
        ref += float(torch.dot(piece, piece))
        err += float(torch.dot(d, d))
    return ref, err
