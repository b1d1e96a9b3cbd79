"""The plain rounding error of a written weight, ||W - W_hat||^2 against ||W||^2, for the report of
sites the method scores no other way (round-to-nearest, the lm_head). The method's own proxies,
weighted by the propagated statistics, are computed where it rounds (quant/site.py, value_output.py).
"""

from __future__ import annotations

import torch

from . import grid


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
