"""Adaptive rounding without data: GPTQ's error feedback with a Hessian that comes from the
weights (a transform, a paired matrix or a prior), not from calibration activations.

The loss is tr((W - W_hat)^T H (W - W_hat)) for W[K, N]. Rows of W (inputs) are rounded one at
a time; each rounding error is pushed onto the rows not yet rounded through H^-1, so later rows
compensate. Scales of a block are chosen when its first row is reached, from the already
compensated weights. With a diagonal H nothing is fed back and the result is plain rounding.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import QuantFormat
from . import grid, kernels, scales

LAZY_ROWS = 128


@dataclasses.dataclass
class LowRank:
    """A structured Hessian H = diag(d) + u u^T (per-channel variance plus the mean direction).

    GPTQ under such an H needs no K x K matrix: every rounding error moves the rows still to be
    rounded along u / d (Sherman-Morrison), so it runs in O(K N) time and O(N) extra memory.
    """

    diag: torch.Tensor  # [K]
    vec: torch.Tensor  # [K]

    def scaled(self, a: torch.Tensor) -> "LowRank":
        """The Hessian of W' = W / a (rows): diag(a) H diag(a)."""
        return LowRank(self.diag * a * a, self.vec * a)

    def diagonal(self) -> torch.Tensor:
        return self.diag + self.vec * self.vec

    def dense(self) -> torch.Tensor:
        return torch.diag(self.diag) + torch.outer(self.vec, self.vec)

    @classmethod
    def identity(cls, k: int, device=None) -> "LowRank":
        return cls(torch.ones(k, device=device), torch.zeros(k, device=device))


@dataclasses.dataclass
class BlockLowRank:
    """H = blockdiag(B_0, B_1, ...) + u u^T with b x b blocks: the statistics of a LowRank seen
    through an online block transform (T^T (diag(d) + u u^T) T). GPTQ under it needs no K x K
    matrix: inside a block the error feedback is dense, across blocks it runs along one direction."""

    blocks: torch.Tensor  # [K/b, b, b]
    vec: torch.Tensor  # [K]

    def diagonal(self) -> torch.Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).reshape(-1) + self.vec * self.vec

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks) + torch.outer(self.vec, self.vec)


class DenseFactor:
    """A dense H whose GPTQ feedback factor is computed on its first rounding and kept for the next
    (V is rounded under one H in each of the V/O pair's alternations)."""

    def __init__(self, h: torch.Tensor):
        self.h = h
        self._factors: dict = {}

    def feedback(self, k: int, kp: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
        if (kp, damp) not in self._factors:
            self._factors[(kp, damp)] = _feedback(self.h, k, kp, damp)
        return self._factors[(kp, damp)]

    def diagonal(self) -> torch.Tensor:
        return torch.diagonal(self.h)


def hessian_diagonal(h) -> torch.Tensor:
    return h.diagonal() if isinstance(h, (LowRank, BlockLowRank, DenseFactor)) else torch.diagonal(h)


def gptq(
    w: torch.Tensor,
    h,
    fmt: QuantFormat,
    scale_dtype: torch.dtype = torch.float32,
    search_scales: bool = True,
    damp: float = 0.01,
    compiled: bool | None = None,
) -> grid.Quantized:
    """Quantize W[K, N] minimising tr(D^T H D); H is [K, K] (symmetric PSD) or a LowRank.
    `compiled`: the row loops compiled (kernels.py; default on the CPU) or as torch ops (elsewhere)."""
    compiled = w.device.type == "cpu" if compiled is None else compiled
    if isinstance(h, LowRank):
        return _gptq_low_rank(w, h, fmt, scale_dtype, search_scales, damp, compiled)
    if isinstance(h, BlockLowRank):
        if compiled and w.shape[0] % fmt.block_size == 0:
            return _gptq_block_low_rank(w, h, fmt, scale_dtype, search_scales, damp)
        h = h.dense()
    k, n = w.shape
    bs = fmt.block_size
    kb = -(-k // bs)
    kp = kb * bs
    wt = torch.zeros(n, kp, dtype=torch.float32, device=w.device)
    wt[:, :k] = w.t().to(torch.float32)
    hinv, importance = h.feedback(k, kp, damp) if isinstance(h, DenseFactor) else _feedback(h, k, kp, damp)

    codes = torch.zeros(n, kp, dtype=torch.uint8, device=w.device)
    scale_out = torch.zeros(n, kb, dtype=torch.float32, device=w.device)
    zp_out = None if fmt.symmetric else torch.zeros(n, kb, dtype=torch.uint8, device=w.device)
    zero_code = 1 << (fmt.container_bits - 1)

    lazy = max(LAZY_ROWS, bs)  # a multiple of the block size: a block never spans two chunks
    if compiled:
        for i1 in range(0, kp, lazy):
            i2 = min(i1 + lazy, kp)
            rows = slice(i1, i2)
            out = _Compiled(fmt, scale_dtype, search_scales, n, i2 - i1)
            errors = wt[:, rows].contiguous()
            kernels.gptq_chunk(errors.numpy(), hinv[rows, rows].contiguous().numpy(), importance[rows].contiguous().numpy(),
                               *out.settings, out.codes, out.scales, out.zeros, errors.numpy())  # fmt: skip
            out.write(codes[:, rows], scale_out[:, i1 // bs : i2 // bs], None if zp_out is None else zp_out[:, i1 // bs : i2 // bs])
            wt[:, i2:].addmm_(errors, hinv[rows, i2:], alpha=-1.0)
        return grid.Quantized(codes=codes.reshape(n, kb, bs), scales=scale_out, zero_points=zp_out, k=k, fmt=fmt)
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
            block_w[:, col:].addr_(err, hinv[i, i:i2], alpha=-1.0)  # in place: no [N, rows] temporary
            errors[:, col] = err
        wt[:, i2:].addmm_(errors, hinv[i1:i2, i2:], alpha=-1.0)  # in place: no [N, K] temporary per chunk
    return grid.Quantized(codes=codes.reshape(n, kb, bs), scales=scale_out, zero_points=zp_out, k=k, fmt=fmt)


def _feedback(h: torch.Tensor, k: int, kp: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's feedback factor U (upper triangular, U^T U = H^-1, float32) and the diagonal of H, for
    H padded to kp rows and damped; dead inputs (H_jj <= 0) get a unit diagonal. One Cholesky and one
    triangular inverse: with J the reversal, J H J = R R^T gives H^-1 = (J R^-1 J)^T (J R^-1 J).
    Each float64 K x K temporary is dropped as soon as it is used (V's dense H is a layer's peak)."""
    hp = torch.eye(kp, dtype=torch.float64, device=h.device)
    hp[:k, :k] = h
    diag = torch.diagonal(hp).clone()
    dead = diag <= 0
    hp[dead, dead] = 1.0
    hp.diagonal().add_(damp * float(diag[~dead].mean() if (~dead).any() else 1.0))
    importance = torch.diagonal(hp).to(torch.float32)
    r = torch.linalg.cholesky(hp.flip(0, 1))
    del hp
    u = torch.linalg.solve_triangular(r, torch.eye(kp, dtype=torch.float64, device=h.device), upper=False)
    del r
    return u.flip(0, 1).to(torch.float32), importance


def _gptq_low_rank(w, h: LowRank, fmt, scale_dtype, search_scales, damp, compiled=False) -> grid.Quantized:
    """GPTQ for H = diag(d) + u u^T, exactly, without forming H.

    Rounding row i with error e_i changes each later row j by (u_j / d_j) * e_i u_i / (1 + s_{i+1}),
    s_{i+1} = sum_{k > i} u_k^2 / d_k: all later rows move along one direction, so one running
    accumulator A [N] carries every update (row j is read as W_j + (u_j / d_j) A).
    """
    k, n = w.shape
    bs = fmt.block_size
    kb = -(-k // bs)
    kp = kb * bs
    d = torch.ones(kp, dtype=torch.float64, device=w.device)
    u = torch.zeros(kp, dtype=torch.float64, device=w.device)
    d[:k] = h.diag.to(torch.float64)
    u[:k] = h.vec.to(torch.float64)
    live = d[:k] > 0
    d[:k] = d[:k] + damp * float(h.diagonal()[live].mean() if bool(live.any()) else 1.0)
    ratio = (u / d).to(torch.float32)
    tail = torch.flip(torch.cumsum(torch.flip(u * u / d, [0]), 0), [0])  # s_i = sum_{k >= i}
    s_next = torch.cat([tail[1:], tail.new_zeros(1)])
    coef = (u / (1.0 + s_next)).to(torch.float32)
    wt = w.to(torch.float32)  # read only: no copy unless K needs padding to whole blocks
    if kp != k:
        wt = torch.cat([wt, wt.new_zeros(kp - k, n)])
    importance = (d + u * u).to(torch.float32)
    acc = torch.zeros(n, dtype=torch.float32, device=w.device)
    codes = torch.zeros(n, kp, dtype=torch.uint8, device=w.device)
    scale_out = torch.zeros(n, kb, dtype=torch.float32, device=w.device)
    zp_out = None if fmt.symmetric else torch.zeros(n, kb, dtype=torch.uint8, device=w.device)
    centre_code = float(1 << (fmt.container_bits - 1))
    grid_centre = float(1 << (fmt.bits - 1))
    qmax = grid.grid_max(fmt.bits)
    if compiled:
        out = _Compiled(fmt, scale_dtype, search_scales, n, kp)
        kernels.gptq_low_rank(wt.numpy(), ratio.numpy(), coef.numpy(), importance.numpy(),
                              *out.settings, out.codes, out.scales, out.zeros)  # fmt: skip
        out.write(codes, scale_out, zp_out)
        return grid.Quantized(codes=codes.reshape(n, kb, bs), scales=scale_out, zero_points=zp_out, k=k, fmt=fmt)
    for b in range(kb):
        rows = slice(b * bs, (b + 1) * bs)
        current = wt[rows] + ratio[rows].unsqueeze(1) * acc  # [bs, N] as the group starts
        s, z = _group_params(current.t().contiguous(), importance[rows], fmt, scale_dtype, search_scales)
        scale_out[:, b] = s
        if zp_out is not None:
            zp_out[:, b] = z
        # Codes as quantize_blocks makes them, kept in float inside the row loop (one cast per row).
        zero = z.to(torch.float32) if z is not None else grid_centre
        offset = 0.0 if z is not None else centre_code - grid_centre
        inv = torch.where(s != 0, 1.0 / torch.where(s != 0, s, 1.0), 0.0)
        for i in range(b * bs, (b + 1) * bs):
            x = wt[i] + ratio[i] * acc
            q = grid.round_clamped(x * inv + zero, qmax)
            codes[:, i] = (q + offset).to(torch.uint8)
            err = x - (q - zero) * s
            acc += err * coef[i]
    return grid.Quantized(codes=codes.reshape(n, kb, bs), scales=scale_out, zero_points=zp_out, k=k, fmt=fmt)


def _gptq_block_low_rank(w, h: BlockLowRank, fmt, scale_dtype, search_scales, damp) -> grid.Quantized:
    """GPTQ for H = blockdiag(B) + u u^T (kernels.gptq_block_low_rank): the dense path's rounding, from
    b x b factorisations instead of a K x K one.

    GPTQ moves later rows by rows of U, the upper Cholesky factor of H^-1, whose part from block k on
    is that of (H_{>=k})^-1 (the trailing H). By Sherman-Morrison its block-k rows are
    [M_k, -z_k z_later^T / (1 + tau_k)] with z = B^-1 u, tau_k = sum over blocks l >= k of u_l . z_l and
    M_k = B_k^-1 - z_k z_k^T / (1 + tau_k): so U_kk = chol(M_k) (the feedback inside the block) and
    U_k,later = -(U_kk^-T z_k) z_later^T / (1 + tau_k) (one direction z across blocks)."""
    k, n = w.shape
    bs = fmt.block_size
    nb, b, _ = h.blocks.shape
    blocks = h.blocks.to(torch.float64).clone()
    u = h.vec.to(torch.float64).reshape(nb, b)
    diag = h.diagonal().to(torch.float64)
    live = diag > 0
    blocks.diagonal(dim1=1, dim2=2)[~live.reshape(nb, b)] = 1.0  # as the dense path: a dead row weighs 1
    blocks.diagonal(dim1=1, dim2=2).add_(damp * float(diag[live].mean() if bool(live.any()) else 1.0))
    inv = torch.cholesky_inverse(torch.linalg.cholesky(blocks))
    z = (inv @ u.unsqueeze(-1))[..., 0]  # B^-1 u per block
    tau = torch.flip(torch.cumsum(torch.flip((u * z).sum(1), [0]), 0), [0])  # blocks l >= k
    m = inv - z.unsqueeze(2) * z.unsqueeze(1) / (1.0 + tau).view(nb, 1, 1)
    upper = torch.linalg.cholesky(m, upper=True)
    pivots = upper.diagonal(dim1=1, dim2=2)
    feedback = upper / pivots.unsqueeze(2)
    across = -torch.linalg.solve_triangular(upper.transpose(1, 2), z.unsqueeze(-1), upper=False)[..., 0] / (1.0 + tau).unsqueeze(1)
    g = across / pivots
    importance = (blocks.diagonal(dim1=1, dim2=2).reshape(-1) + h.vec.to(torch.float64) ** 2).to(torch.float32)
    out = _Compiled(fmt, scale_dtype, search_scales, n, k)
    kernels.gptq_block_low_rank(
        w.to(torch.float32).numpy(), z.reshape(-1).to(torch.float32).numpy(), feedback.to(torch.float32).numpy(),
        g.reshape(-1).to(torch.float32).numpy(), importance.numpy(), b, *out.settings, out.codes, out.scales, out.zeros,
    )  # fmt: skip
    kb = k // bs
    codes = torch.empty(n, k, dtype=torch.uint8)
    scale_out = torch.empty(n, kb, dtype=torch.float32)
    zp_out = None if fmt.symmetric else torch.empty(n, kb, dtype=torch.uint8)
    out.write(codes, scale_out, zp_out)
    return grid.Quantized(codes=codes.reshape(n, kb, bs), scales=scale_out, zero_points=zp_out, k=k, fmt=fmt)


class _Compiled:
    """The compiled loops' settings for one format and their output arrays (scales and zero points
    per block, codes per row), copied into the Quantized tensors by `write`."""

    def __init__(self, fmt: QuantFormat, scale_dtype: torch.dtype, search_scales: bool, n: int, rows: int):
        if scale_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"scales of dtype {scale_dtype} are not supported: use float32 or float16")
        offset = (1 << (fmt.container_bits - 1)) - (1 << (fmt.bits - 1)) if fmt.symmetric else 0
        ratios = lambda r: np.asarray(r, dtype=np.float32)  # noqa: E731  (as scales.py holds them)
        self.settings = (
            fmt.block_size, np.float32(grid.grid_max(fmt.bits)), fmt.symmetric, np.float32(offset), scale_dtype == torch.float16,
            search_scales, ratios(scales.SYMMETRIC_RATIOS), ratios(scales.ASYMMETRIC_RATIOS), scales.REFINE_STEPS,
        )  # fmt: skip
        blocks = rows // fmt.block_size
        self.codes = np.empty((n, rows), dtype=np.uint8)
        self.scales = np.empty((n, blocks), dtype=np.float32)
        self.zeros = np.empty((n, blocks), dtype=np.float32)

    def write(self, codes: torch.Tensor, scale_out: torch.Tensor, zp_out: torch.Tensor | None) -> None:
        codes.copy_(torch.from_numpy(self.codes))
        scale_out.copy_(torch.from_numpy(self.scales))
        if zp_out is not None:
            zp_out.copy_(torch.from_numpy(self.zeros).to(torch.uint8))


def _group_params(group, importance, fmt, scale_dtype, search_scales):
    blocks = group.unsqueeze(1)  # [N, 1, bs]
    if search_scales:
        s, z = scales.search(blocks, fmt, importance.view(1, 1, -1), scale_dtype)
    else:
        s, z = grid.rtn_params(blocks, fmt, scale_dtype)
    return s[:, 0], (None if z is None else z[:, 0])


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h, consume: bool = False) -> float:
    """tr((W - W_hat)^T H (W - W_hat)); W_hat None means zero; H None means identity, a vector diag(H).
    `consume`: W_hat is the caller's temporary, overwritten by W_hat - W (exactly -(W - W_hat), so
    the same sums) instead of a third layer-sized buffer."""
    if isinstance(h, BlockLowRank):
        d = (w if w_hat is None else w - w_hat).to(torch.float64)
        nb, b, _ = h.blocks.shape
        rows = d.reshape(nb, b, -1)
        return float((rows * (h.blocks.to(torch.float64) @ rows)).sum()) + float(((h.vec.double() @ d) ** 2).sum())
    if isinstance(h, LowRank):  # row norms and one product: no [K, N] temporaries beyond D itself
        if consume and w_hat is not None and w_hat.dtype == w.dtype == torch.float32:
            d = w_hat.sub_(w)  # the sign does not reach the squares
        else:
            d = (w if w_hat is None else w - w_hat).to(torch.float32)
        rows = torch.linalg.vector_norm(d, dim=1).double() ** 2
        return float((h.diag.double() * rows).sum()) + float(((h.vec @ d).double() ** 2).sum())
    d = (w if w_hat is None else w - w_hat).to(torch.float64)
    if h is None:
        return float((d * d).sum())
    h = h.to(torch.float64)
    if h.dim() == 1:
        return float((h.unsqueeze(1) * d * d).sum())
    return float((d * (h @ d)).sum())
