"""Round-to-nearest equals ONNX Runtime's own blockwise quantizer (MLAS) byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq_onnx.config import QuantFormat
from dfq_onnx.graph.pack import matmulnbits_b, matmulnbits_zero_points, pack_along_last, unpack_along_last
from dfq_onnx.quant import grid, proxy

ort_kernels = pytest.importorskip("onnxruntime.capi._pybind_state")
KERNELS = {2: "quantize_matmul_2bits", 4: "quantize_matmul_4bits", 8: "quantize_matmul_8bits"}


def ort_quantize(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """ORT's quantizer exactly as its Python MatMulNBitsQuantizer calls it (K zero-padded first)."""
    k, n = w.shape
    kb = -(-k // block)
    wp = np.pad(w, ((0, kb * block - k), (0, 0)))
    per_byte = 8 // bits
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    zp = np.zeros((n, -(-kb // per_byte)), np.uint8)
    scales = np.zeros((n, kb), w.dtype)
    getattr(ort_kernels, KERNELS[bits])(packed, wp, scales, zp, block, n, k, symmetric)
    return packed, scales, zp


def matmulnbits_bytes(q: grid.Quantized, bits: int) -> np.ndarray:
    """B as the graph writer stores it (padding rows past K zeroed, as ORT leaves them)."""
    from dfq_onnx.graph.rewrite import PackedWeight

    packed = PackedWeight(q.fmt, q.k, q.n, q.codes.numpy(), q.scales.numpy(), None)
    return packed.matmulnbits_tensors()["B"][0]


def planted(rng, k, n, dtype=np.float32):
    """Gaussian weights with outlier channels, exact zeros and exact ties (rounding edge cases)."""
    w = rng.standard_normal((k, n)) * rng.choice([0.01, 1.0, 30.0])
    w[:, rng.integers(0, n)] *= 20
    w[rng.random(w.shape) < 0.05] = 0
    w[: k // 4] = np.round(w[: k // 4] * 4) / 4
    return w.astype(dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
def test_rtn_bytes_equal_ort(bits, symmetric, block):
    rng = np.random.default_rng(bits * 1000 + block + symmetric)
    # K = 132 pads the last block. (When K is not a multiple of the codes per byte, ORT fills the
    # rest of the last byte with leftovers of the previous rows; the kernel never reads them.)
    for k, n in [(256, 7), (132, 5), (96, 3)]:
        w = planted(rng, k, n)
        packed, scales, zp = ort_quantize(w, bits, block, symmetric)
        q = grid.rtn(torch.from_numpy(w), QuantFormat(bits, block, symmetric))
        assert np.array_equal(matmulnbits_bytes(q, bits), packed)
        assert q.scales.numpy().tobytes() == scales.tobytes()  # sign of -0.0 included
        if not symmetric:
            assert np.array_equal(matmulnbits_zero_points(q.zero_points.numpy(), bits), zp)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_fp16_scales_equal_ort(symmetric):
    rng = np.random.default_rng(7)
    w = planted(rng, 128, 9, np.float16)
    packed, scales, zp = ort_quantize(w, 4, 32, symmetric)
    q = grid.rtn(torch.from_numpy(w.astype(np.float32)), QuantFormat(4, 32, symmetric), torch.float16)
    assert np.array_equal(matmulnbits_bytes(q, 4), packed)
    assert np.array_equal(q.scales.numpy().astype(np.float16), scales)
    if not symmetric:
        assert np.array_equal(matmulnbits_zero_points(q.zero_points.numpy(), 4), zp)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("stored_transposed", [False, True])
def test_rtn_in_pieces_equals_ort(monkeypatch, symmetric, stored_transposed):
    """Pieces of a few blocks, read from fp16 storage in either layout, give ORT's bytes."""
    monkeypatch.setattr(grid, "CHUNK_ELEMENTS", 100)
    rng = np.random.default_rng(11 + symmetric)
    w = planted(rng, 132, 13, np.float16)
    packed, scales, zp = ort_quantize(w, 4, 32, symmetric)
    stored = torch.from_numpy(np.ascontiguousarray(w.T) if stored_transposed else w)
    q = grid.rtn(stored.t() if stored_transposed else stored, QuantFormat(4, 32, symmetric), torch.float16)
    assert np.array_equal(matmulnbits_bytes(q, 4), packed)
    assert np.array_equal(q.scales.numpy().astype(np.float16), scales)
    if not symmetric:
        assert np.array_equal(matmulnbits_zero_points(q.zero_points.numpy(), 4), zp)
    ref, err = proxy.quantized_errors(stored.t() if stored_transposed else stored, q)
    w64 = torch.from_numpy(w.astype(np.float64))
    assert ref == pytest.approx(float((w64**2).sum()), rel=1e-5)
    assert err == pytest.approx(float(((w64 - q.dequantize().double()) ** 2).sum()), rel=1e-4)


def test_round_half_away_matches_c_roundf():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 7.5, 0.0])
    assert grid.round_half_away(x).tolist() == [1, 2, 3, -1, -2, -3, 0, 0, 8, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_error_within_grid_step(bits, symmetric):
    w = torch.from_numpy(planted(np.random.default_rng(bits), 96, 6))
    fmt = QuantFormat(bits, 32, symmetric)
    q = grid.rtn(w, fmt)
    w_hat = q.dequantize()
    assert w_hat.shape == w.shape
    step = q.scales.abs().repeat_interleave(32, dim=1)[:, :96].t()
    # Half a step inside the grid; symmetric grids have one level fewer on the positive side
    # of the largest magnitude, so values there may clip by up to one step.
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert bool(((w - w_hat).abs() <= bound).all())
    # Codes fit the grid; symmetric 3-bit lives in [4, 11] of its 4-bit container.
    lo, hi = int(q.codes.min()), int(q.codes.max())
    if bits == 3 and symmetric:
        assert 4 <= lo and hi <= 11
    else:
        assert hi < (1 << bits)


def test_pack_roundtrip():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 1 << bits, size=(5, 3, 37)).astype(np.uint8)
        packed = pack_along_last(codes, bits)
        assert np.array_equal(unpack_along_last(packed, bits, 37), codes)
    assert pack_along_last(np.array([1, 2], np.uint8), 4).tolist() == [0x21]
