"""Group-wise integer grids on W[K, N]: blocks of `block_size` consecutive rows per column.

Layout is MatMulNBits' own: blocks are stored as [N, k_blocks, block_size] (row n of the
stored tensor is column n of W), codes are unsigned container codes, and a symmetric
grid has the implicit zero point 2^(container_bits - 1).

Round-to-nearest reproduces ONNX Runtime's DEFAULT quantizer (MLAS) bit for bit: the same
float32 operations in the same order (reciprocal of the stored scale, add the zero point,
then round half away from zero).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import QuantFormat
from . import grid_kernels


@dataclasses.dataclass
class Quantized:
    """Codes and quantization parameters of one weight matrix W[K, N]."""

    codes: torch.Tensor  # uint8 [N, k_blocks, block_size], container codes
    scales: torch.Tensor  # float32 [N, k_blocks] (values representable in the model's float dtype)
    zero_points: torch.Tensor | None  # uint8 [N, k_blocks]; None: symmetric, implicit midpoint
    k: int  # rows of W before padding to whole blocks
    fmt: QuantFormat

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def zero_point_values(self) -> torch.Tensor:
        if self.zero_points is not None:
            return self.zero_points
        mid = 1 << (self.fmt.container_bits - 1)
        return torch.full(self.scales.shape, mid, dtype=torch.uint8, device=self.scales.device)

    def dequantize(self) -> torch.Tensor:
        """W_hat[K, N] in float32 (contiguous), exactly as the kernels compute (q - z) * s; compiled
        on the CPU (one pass, no transposed temporaries), dequantize_reference elsewhere."""
        if self.codes.device.type != "cpu":
            return self.dequantize_reference()
        out = torch.empty((self.k, self.n), dtype=torch.float32)
        grid_kernels.dequantize(self.codes.numpy(), self.scales.numpy(), self.zero_point_values().numpy(), out.numpy())
        return out

    def dequantize_reference(self) -> torch.Tensor:
        """dequantize in torch ops."""
        z = self.zero_point_values().t().to(torch.float32).unsqueeze(1)  # [k_blocks, 1, N]
        codes = self.codes.permute(1, 2, 0).contiguous()  # [k_blocks, block_size, N]: W's own layout
        rows = (codes.to(torch.float32) - z) * self.scales.t().unsqueeze(1)
        return rows.reshape(-1, self.n)[: self.k]


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """W[K, N] -> [N, k_blocks, block_size], zero-padding K to whole blocks (as ORT does)."""
    k, n = w.shape
    k_blocks = -(-k // block_size)
    pad = k_blocks * block_size - k
    wt = w.t()
    if pad:
        wt = torch.nn.functional.pad(wt, (0, pad))
    return wt.reshape(n, k_blocks, block_size)


def to_row_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """W[K, N] -> [k_blocks, block_size, N] (a view when K is whole blocks): W's own layout, so
    per-block reductions run along a middle axis, vectorised over N, with no transposed copy."""
    k, n = w.shape
    pad = -k % block_size
    if pad:
        w = torch.nn.functional.pad(w, (0, 0, 0, pad))
    return w.reshape(-1, block_size, n)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly, in the input's precision.

    torch.round rounds half to even, and floor(|x| + 0.5) can round up in float32;
    truncation plus an exact fractional test does neither.
    """
    t = torch.trunc(x)
    frac = x - t  # exact for IEEE floats
    return t + torch.sign(x) * (frac.abs() >= 0.5).to(x.dtype)


_BELOW_HALF = float(torch.tensor(0.5, dtype=torch.float32).nextafter(torch.tensor(0.0)))  # 0.49999997


def round_clamped(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """clamp(roundf(x), 0, qmax) for float32 x, exactly, in three elementwise ops.

    floor(x + 0.5) equals roundf(x) for every float32 x >= 0 except 0.49999997 (where x + 0.5
    rounds up to 1.0), and both fall to 0 or below for x < 0, where the clamp takes over.
    """
    r = torch.floor(x + 0.5)
    r = r - (x == _BELOW_HALF).to(r.dtype)
    return torch.clamp(r, 0, qmax)


def grid_max(bits: int) -> int:
    return (1 << bits) - 1


def rtn_params(
    blocks: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scales (and zero points) per block, as MLAS computes them.

    Symmetric: the signed value of largest magnitude maps to the lowest code
    (scale = -v / 2^(b-1)), so all 2^b levels are used (q4_0 style).
    Asymmetric: the range [min(x, 0), max(x, 0)] spans all levels; zero point rounded.
    Scales are rounded to the model's dtype before use, like MLAS' ScaleT.
    `dim` is the axis along a block ([N, k_blocks, block_size]: -1; [k_blocks, block_size, N]: 1).
    """
    bits = fmt.bits
    mx = blocks.amax(dim=dim)
    mn = blocks.amin(dim=dim)
    # An all-zero block keeps MLAS' signed zero: its scan leaves min = max = the first element.
    all_zero = (mx == 0) & (mn == 0)
    if fmt.symmetric:
        signed_max = torch.where(mx.abs() > mn.abs(), mx, mn)
        signed_max = torch.where(all_zero, blocks.select(dim, 0), signed_max)
        scale = -signed_max / float(1 << (bits - 1))
        return _as_scale_dtype(scale, scale_dtype), None
    mn = torch.clamp(mn, max=0.0)
    mx = torch.clamp(mx, min=0.0)
    scale_f = torch.where(all_zero, 0.0, (mx - mn) / float(grid_max(bits)))
    nonzero = scale_f != 0
    zp_f = torch.where(nonzero, 0.0 - mn / torch.where(nonzero, scale_f, 1.0), mn)
    zp = torch.clamp(round_half_away(zp_f), 0, grid_max(bits)).to(torch.uint8)
    return _as_scale_dtype(scale_f, scale_dtype), zp


def _as_scale_dtype(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return scale.to(dtype).to(torch.float32)


def quantize_blocks(
    blocks: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, fmt: QuantFormat, dim: int = -1
) -> torch.Tensor:
    """Container codes for given scales: clamp(roundf(x * (1/s) + z), 0, 2^b - 1) in float32."""
    bits = fmt.bits
    inv = torch.where(scales != 0, 1.0 / torch.where(scales != 0, scales, 1.0), 0.0)
    if zero_points is None:
        z = torch.full_like(scales, float(1 << (bits - 1)))
    else:
        z = zero_points.to(torch.float32)
    x = blocks * inv.unsqueeze(dim) + z.unsqueeze(dim)
    q = round_clamped(x, grid_max(bits)).to(torch.uint8)
    if zero_points is None and fmt.container_bits != bits:
        # Re-centre a symmetric 3-bit grid on the 4-bit container's implicit zero point.
        q = q + ((1 << (fmt.container_bits - 1)) - (1 << (bits - 1)))
    return q


# Elements of a float32 temporary in the chunked CPU loops (2 MiB): served from the heap's kept top,
# where whole-matrix temporaries would each be a fresh mapping whose pages the kernel zeroes.
CHUNK_ELEMENTS = 1 << 19


def row_block_chunks(w: torch.Tensor, block_size: int):
    """(k-block slice, column slice, float32 [k_blocks', block_size, N'] piece of W) covering W[K, N].

    Pieces follow the stored layout: whole columns when W is a transposed view of [N, K] storage,
    whole rows of blocks otherwise. On a GPU the whole matrix is one piece.
    """
    rows = to_row_blocks(w, block_size)
    k_blocks, _, n = rows.shape
    if w.device.type != "cpu":
        yield slice(0, k_blocks), slice(0, n), rows.to(torch.float32)
        return
    column_major = w.stride(0) == 1 and n > 1
    kb_step = k_blocks if column_major else max(1, min(k_blocks, CHUNK_ELEMENTS // (block_size * n)))
    n_step = max(1, min(n, CHUNK_ELEMENTS // (kb_step * block_size)))
    for kb0 in range(0, k_blocks, kb_step):
        kbs = slice(kb0, min(kb0 + kb_step, k_blocks))
        for n0 in range(0, n, n_step):
            ns = slice(n0, min(n0 + n_step, n))
            yield kbs, ns, rows[kbs, :, ns].to(torch.float32)


def rtn(w: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """Round-to-nearest of W[K, N] (any float dtype) with min/max scales: ORT DEFAULT's result.
    Compiled for a float32 W on the CPU (one pass over W, no temporaries), rtn_reference otherwise."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or scale_dtype not in (torch.float32, torch.float16):
        return rtn_reference(w, fmt, scale_dtype)
    k, n = w.shape
    k_blocks = -(-k // fmt.block_size)
    codes = torch.empty((n, k_blocks, fmt.block_size), dtype=torch.uint8)
    scales = torch.empty((n, k_blocks), dtype=torch.float32)
    zero_points = torch.empty((n, k_blocks), dtype=torch.uint8)
    offset = (1 << (fmt.container_bits - 1)) - (1 << (fmt.bits - 1)) if fmt.symmetric else 0
    grid_kernels.rtn(
        w.numpy(), float(grid_max(fmt.bits)), fmt.symmetric, scale_dtype == torch.float16, float(offset),
        codes.numpy(), scales.numpy(), zero_points.numpy(),
    )  # fmt: skip
    return Quantized(codes=codes, scales=scales, zero_points=None if fmt.symmetric else zero_points, k=k, fmt=fmt)


def rtn_reference(w: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32) -> Quantized:
    """rtn in torch ops, for any float dtype and device.

    Computed piece by piece in W's stored layout (every step is per block, so pieces give the
    same bits as the whole), written into MatMulNBits' [N, k_blocks, block_size].
    """
    k, n = w.shape
    k_blocks = -(-k // fmt.block_size)
    codes = torch.empty((n, k_blocks, fmt.block_size), dtype=torch.uint8, device=w.device)
    scales = torch.empty((n, k_blocks), dtype=torch.float32, device=w.device)
    zero_points = None if fmt.symmetric else torch.empty((n, k_blocks), dtype=torch.uint8, device=w.device)
    for kbs, ns, piece in row_block_chunks(w, fmt.block_size):
        s, z = rtn_params(piece, fmt, scale_dtype, dim=1)
        codes[ns, kbs] = quantize_blocks(piece, s, z, fmt, dim=1).permute(2, 0, 1)
        scales[ns, kbs] = s.t()
        if zero_points is not None:
            zero_points[ns, kbs] = z.t()
    return Quantized(codes=codes, scales=scales, zero_points=zero_points, k=k, fmt=fmt)


def fake_quant(w: torch.Tensor, fmt: QuantFormat, scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Round-to-nearest then dequantize: W_hat[K, N]."""
    return rtn(w, fmt, scale_dtype).dequantize()
