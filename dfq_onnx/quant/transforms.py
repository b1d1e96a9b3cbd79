"""Function-preserving transforms, chosen from the weights to lower the proxy after rounding.

Diagonal input scaling: for linears that read one activation x (q/k/v after a norm, gate/up after
a norm, down after up), W' = diag(a)^-1 W and x' = x * a leave x W unchanged. The gain a is folded
for free into the norm gain (or into up's columns). An input channel k of W' is rounded with W'
but its error reaches the output multiplied by a_k, so the proxy of W' weights row k by h_k a_k^2.

The search is a small grid over a = h^(-alpha/2) * r^beta (h: the prior importance of the input
channel, r: the spread of the channel's weights), each candidate scored by the real rounding
error; alpha = beta = 0 (no transform) is always a candidate, so the result is never worse.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import QuantFormat
from . import grid, grid_kernels, scales

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BETAS = (0.0, 0.5)


@dataclasses.dataclass
class DiagonalChoice:
    a: torch.Tensor  # [K] multiplicative input scaling (x' = x * a, W' = W / a)
    alpha: float
    beta: float
    error: float  # weighted proxy of all consumers at the chosen a (round-to-nearest)

    @property
    def is_identity(self) -> bool:
        return self.alpha == 0.0 and self.beta == 0.0


def rounding_error(w: torch.Tensor, fmt: QuantFormat, weight: torch.Tensor | None, divisor: torch.Tensor | None = None) -> float:
    """Weighted squared error of round-to-nearest of W[K, N] / divisor (rows divided; min/max scales),
    rows weighted by `weight`. Compiled on the CPU (the diagonal search calls it for every candidate)."""
    if w.device.type == "cpu":
        k, n = w.shape
        ones = torch.ones(k, dtype=torch.float32)
        out = np.empty(n, dtype=np.float64)
        grid_kernels.rtn_errors(
            w.to(torch.float32).numpy(), (ones if divisor is None else divisor.to(torch.float32)).numpy(),
            (ones if weight is None else weight.to(torch.float32)).contiguous().numpy(),
            fmt.block_size, float(grid.grid_max(fmt.bits)), fmt.symmetric, out,
        )  # fmt: skip
        return float(out.sum())
    return rounding_error_reference(w if divisor is None else w / divisor.unsqueeze(1), fmt, weight)


def rounding_error_reference(w: torch.Tensor, fmt: QuantFormat, weight: torch.Tensor | None) -> float:
    """rounding_error in torch ops, piece by piece: the path off the CPU and the compiled loop's reference."""
    row_weight = None if weight is None else grid.to_row_blocks(weight.view(-1, 1), fmt.block_size)  # [kb, bs, 1]
    total = 0.0
    for kbs, _, x in grid.row_block_chunks(w, fmt.block_size):  # W's own layout, in pieces
        s, z = grid.rtn_params(x, fmt, dim=1)
        zero = float(1 << (fmt.bits - 1)) if z is None else z.to(torch.float32)
        part_weight = None if row_weight is None else row_weight[kbs]
        total += float(scales.candidate_errors(x, s, zero, grid.grid_max(fmt.bits), part_weight, dim=1).sum())
    return total


SAMPLE_STRIDE = 4  # the search first scores every candidate on every 4th column and the widest 1/16 ...
SAMPLE_MARGIN = 0.1  # ... then scores whole those within this fraction of the sample's best
SAMPLE_MIN_COLUMNS = 1024  # narrower weights are scored whole


def search_diagonal(
    weights: list[torch.Tensor],
    importance: torch.Tensor | None,
    fmt: QuantFormat,
    alphas: tuple[float, ...] = ALPHAS,
    betas: tuple[float, ...] = BETAS,
    exclude_identity: bool = False,
) -> DiagonalChoice:
    """Best diagonal input scaling shared by linears that read the same activation.

    The error is a sum over columns, and candidates rank alike on every column of a sample: the
    sample drops the clear losers, and the close ones are decided by their whole errors."""
    k = weights[0].shape[0]
    h = torch.ones(k, device=weights[0].device) if importance is None else importance.to(torch.float32)
    h_pos = h.clamp(min=h[h > 0].min() if (h > 0).any() else 1.0)
    spread = torch.stack([torch.maximum(w.amax(dim=1), -w.amin(dim=1)) for w in weights]).amax(0).clamp(min=1e-12)
    candidates = [(alpha, beta) for alpha in (alphas if importance is not None else (0.0,)) for beta in betas]
    scalings = {ab: _normalise(h_pos ** (-ab[0] / 2) * spread**ab[1]) for ab in candidates}
    error = lambda ab, ws: sum(rounding_error(w, fmt, h * scalings[ab] * scalings[ab], divisor=scalings[ab]) for w in ws)  # noqa: E731
    scored = [ab for ab in candidates if ab != (0.0, 0.0) or not exclude_identity]
    if len(scored) > 2 and min(w.shape[1] for w in weights) >= SAMPLE_MIN_COLUMNS:
        sample = [column_sample(w) for w in weights]
        estimate = {ab: error(ab, sample) for ab in scored}
        best_estimate = min(estimate.values())
        scored = [ab for ab in scored if estimate[ab] <= (1.0 + SAMPLE_MARGIN) * best_estimate]
    best: DiagonalChoice | None = None
    for ab in scored:  # in the grid's order: on a tie the first wins
        err = error(ab, weights)
        if best is None or err < best.error:
            best = DiagonalChoice(scalings[ab], ab[0], ab[1], err)
    return best


def column_sample(w: torch.Tensor) -> torch.Tensor:
    """Every SAMPLE_STRIDE-th column of W and the columns of widest range (a few wide columns can
    carry much of a rounding error), as a contiguous copy."""
    n = w.shape[1]
    widest = torch.maximum(w.amax(0), -w.amin(0)).topk(n // (4 * SAMPLE_STRIDE)).indices
    keep = torch.zeros(n, dtype=torch.bool, device=w.device)
    keep[::SAMPLE_STRIDE] = True
    keep[widest] = True
    return w[:, keep].contiguous()


def _normalise(a: torch.Tensor) -> torch.Tensor:
    """Geometric mean 1: a global factor changes nothing, and this keeps the gains well scaled."""
    return a / torch.exp(torch.log(a).mean())


def hadamard(n: int, device=None) -> torch.Tensor | None:
    """Orthonormal Hadamard matrix of size n (a power of two), else None."""
    if n < 1 or n & (n - 1):
        return None
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / (n**0.5)).to(torch.float32)


def random_orthogonal(n: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """A random orthogonal n x n matrix, Haar-distributed (QR of a Gaussian, signs fixed by R's diagonal)."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32).to(device)


def block_rotate(w: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """blockdiag(block, block, ...) @ W for W[K, N]: rows taken b at a time (K a multiple of b)."""
    return BlockDiagonal(block.unsqueeze(0)).times(w)


@dataclasses.dataclass
class BlockDiagonal:
    """blockdiag(B_0, B_1, ...) of equal b x b blocks, applied without forming the K x K matrix.

    `blocks` is [n, b, b], or [1, b, b] for one block repeated along the whole diagonal (a V/O
    transform shared by every head, an online Hadamard). Products cost K*N*b instead of K^2*N.
    """

    blocks: torch.Tensor

    @property
    def size(self) -> int:
        return self.blocks.shape[-1]

    def _count(self, k: int) -> int:
        return k // self.size if self.blocks.shape[0] == 1 else self.blocks.shape[0]

    def times(self, w: torch.Tensor) -> torch.Tensor:
        """blockdiag @ W for W[K, N]."""
        k, n = w.shape
        b = self.size
        return (self.blocks.to(w.dtype) @ w.reshape(self._count(k), b, n)).reshape(k, n)

    def times_(self, w: torch.Tensor, columns: int = 1024) -> torch.Tensor:
        """blockdiag @ W written over W (contiguous), a slab of columns at a time: the same products
        as `times` without a second layer-sized buffer."""
        k, n = w.shape
        b = self.size
        w3 = w.view(self._count(k), b, n)
        blocks = self.blocks.to(w.dtype)
        for c in range(0, n, columns):
            w3[:, :, c : c + columns] = blocks @ w3[:, :, c : c + columns]
        return w

    def right_of(self, w: torch.Tensor) -> torch.Tensor:
        """W @ blockdiag for W[K, N]."""
        k, n = w.shape
        b = self.size
        cols = w.reshape(k, self._count(n), b).transpose(0, 1)  # [blocks, K, b]
        return (cols @ self.blocks.to(w.dtype)).transpose(0, 1).reshape(k, n)

    def inverse(self) -> "BlockDiagonal":
        return BlockDiagonal(torch.linalg.inv(self.blocks.to(torch.float64)).to(self.blocks.dtype))

    def t(self) -> "BlockDiagonal":
        return BlockDiagonal(self.blocks.transpose(1, 2))

    def dense(self, k: int) -> torch.Tensor:
        blocks = self.blocks.expand(self._count(k), -1, -1)
        return torch.block_diag(*blocks)


def online_block_size(k: int, largest: int) -> int | None:
    """The largest power of two <= `largest` that divides K and has a Hadamard matrix (>= 8), or None."""
    b = 1 << (max(largest, 1).bit_length() - 1)
    while b >= 8 and k % b:
        b //= 2
    return b if b >= 8 else None


def apply_value_output(w_v: torch.Tensor, w_o: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V'[:, g] = V[:, g] T and O'[rows of h] = T^-1 O[rows of h] for every KV group g and query head h."""
    blocks = BlockDiagonal(t.unsqueeze(0))
    return blocks.right_of(w_v), blocks.inverse().times(w_o)


def rope_rotation(angles: torch.Tensor, head_dim: int, rotary_dim: int | None = None) -> BlockDiagonal:
    """Column rotation R for a q or k projection: W' = W R multiplies every RoPE pair (i, i + r/2)
    of head h by the unit complex number e^{i angles[h, i]}.

    A unit complex factor commutes with RoPE's own rotation, and multiplying q's pair and k's
    pair by the same c = e^{i phi} keeps every score: Re(c q conj(c k)) = Re(q conj(k)).
    `angles` is [heads of this matrix, r/2]; returns one d x d block per head.
    """
    heads, half = angles.shape
    r = rotary_dim or head_dim
    rot = torch.eye(head_dim, dtype=torch.float32, device=angles.device).repeat(heads, 1, 1)
    x = torch.arange(half, device=angles.device)
    y = x + r // 2
    c, s = torch.cos(angles).to(torch.float32), torch.sin(angles).to(torch.float32)
    rot[:, x, x] = c
    rot[:, y, x] = -s
    rot[:, x, y] = s
    rot[:, y, y] = c
    return BlockDiagonal(rot)
