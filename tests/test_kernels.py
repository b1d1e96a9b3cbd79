"""The compiled GPTQ loops (quant/kernels.py, the CPU path) compute what the torch loops compute,
and the compiled whole-matrix passes (quant/grid_kernels.py) what their torch forms compute.

Both run one algorithm with the same float32 operations; only the order of the sums inside the
scale search differs, so a searched scale's least-squares refinement may land a few ulps away
(asymmetric blocks: up to 1.4e-4 relative in under 1% of the blocks, once in a while one float16
ulp) and a code may flip only where a value sits within round-off of a rounding boundary. Measured
on these problems (6 formats x both Hessian forms x both scale dtypes x search on/off): no code
and no zero point differs and the losses agree to 2e-6 relative. The limits keep a wide margin
while a wrong kernel (a dropped error feedback, a shifted zero point, a scale from the wrong rows,
float16 rounding skipped) moves 10% of the codes or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq_onnx.config import QuantFormat
from dfq_onnx.quant import grid, rounding

from test_gptq_low_rank import problem

MAX_CODE_MISMATCH = 1e-3  # fraction of codes
MAX_LOSS_GAP = 1e-4  # |loss(compiled) / loss(torch) - 1|
MAX_SCALES_MOVED = 2e-2  # fraction of scales more than 1e-5 relative apart
MAX_SCALE_GAP = 2e-3  # the largest relative difference of a scale

FORMATS = [
    QuantFormat(4, 32, True),
    QuantFormat(4, 128, False),
    QuantFormat(3, 32, False),
    QuantFormat(3, 32, True),  # 3-bit codes in the 4-bit container: the symmetric offset
    QuantFormat(2, 16, False),
    QuantFormat(8, 64, True),
]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("search", [True, False], ids=["search", "minmax"])
@pytest.mark.parametrize("dense", [False, True], ids=["low-rank", "dense"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS])
def test_compiled_loops_match_the_torch_loops(fmt, dense, search, scale_dtype):
    w, h = problem(256, 80, seed=fmt.bits + fmt.block_size)
    w = w.to(scale_dtype).to(torch.float32)  # a weight the model's dtype holds
    hess = h.dense() if dense else h
    ref = rounding.gptq(w, hess, fmt, scale_dtype, search, compiled=False)
    got = rounding.gptq(w, hess, fmt, scale_dtype, search, compiled=True)
    assert got.codes.shape == ref.codes.shape and got.codes.dtype == ref.codes.dtype
    mismatch = (got.codes != ref.codes).float().mean().item()
    assert mismatch <= MAX_CODE_MISMATCH, mismatch
    if scale_dtype == torch.float16:  # stored scales: float16 values, as the torch loops store them
        assert torch.equal(got.scales, got.scales.half().float())
    gap = (got.scales - ref.scales).abs() / ref.scales.abs().clamp(min=1e-30)
    assert (gap > 1e-5).float().mean().item() <= MAX_SCALES_MOVED
    assert gap.max().item() <= MAX_SCALE_GAP
    if fmt.symmetric:
        assert got.zero_points is None and ref.zero_points is None
    else:
        assert (got.zero_points != ref.zero_points).float().mean().item() <= MAX_CODE_MISMATCH
    full = h.dense()
    loss_ref = rounding.weighted_error(w, ref.dequantize(), full)
    loss_got = rounding.weighted_error(w, got.dequantize(), full)
    assert abs(loss_got / loss_ref - 1) <= MAX_LOSS_GAP, (loss_got, loss_ref)


def test_compiled_loops_are_the_cpu_default():
    """rounding.gptq on a CPU tensor takes the compiled path: the same bytes as asking for it."""
    w, h = problem(128, 48, seed=1)
    fmt = QuantFormat(4, 32, True)
    default = rounding.gptq(w, h, fmt)
    assert torch.equal(default.codes, rounding.gptq(w, h, fmt, compiled=True).codes)
    assert torch.equal(default.scales, rounding.gptq(w, h, fmt, compiled=True).scales)


def test_unsupported_scale_dtype_is_refused():
    w, h = problem(64, 8, seed=2)
    with pytest.raises(ValueError, match="bfloat16"):
        rounding.gptq(w, h, QuantFormat(4, 32, True), torch.bfloat16, compiled=True)


ONLINE = [(QuantFormat(4, 32, True), 32), (QuantFormat(4, 128, False), 32), (QuantFormat(3, 32, False), 64), (QuantFormat(2, 16, False), 32)]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt,b", ONLINE, ids=[f"int{f.bits}-g{f.block_size}-online{b}" for f, b in ONLINE])
def test_blocks_plus_mean_hessian_rounds_as_the_dense_path(fmt, b, scale_dtype):
    """GPTQ under an online-rotated H (b x b blocks + the mean direction: rounding.BlockLowRank) from
    per-block quantities makes the dense path's codes on the same H, written out as K x K, whether the
    quantization blocks are shorter than, equal to or longer than the rotation's. Measured: no code
    differs. A dropped cross-block feedback, a wrong Sherman-Morrison denominator or an off-by-one
    in the later blocks' tail sum moves several percent of the codes."""
    from dfq_onnx.quant import site, transforms

    w, h = problem(256, 64, seed=b + fmt.bits)
    w = w.to(scale_dtype).to(torch.float32)
    rotated = site.rotated_hessian(h, transforms.BlockDiagonal(transforms.hadamard(b).unsqueeze(0)))
    assert isinstance(rotated, rounding.BlockLowRank)
    dense = rotated.dense()
    ref = rounding.gptq(w, dense, fmt, scale_dtype, compiled=False)
    got = rounding.gptq(w, rotated, fmt, scale_dtype)
    assert (got.codes != ref.codes).float().mean().item() <= MAX_CODE_MISMATCH
    loss_ref = rounding.weighted_error(w, ref.dequantize(), dense)
    loss_got = rounding.weighted_error(w, got.dequantize(), rotated)
    assert abs(loss_got / loss_ref - 1) <= MAX_LOSS_GAP, (loss_got, loss_ref)
    assert loss_ref < 0.6 * rounding.weighted_error(w, grid.rtn(w, fmt, scale_dtype).dequantize(), dense)  # not vacuous


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS])
def test_compiled_rounding_error_matches_the_torch_sum(fmt, layout):
    """The diagonal search's error of each candidate: the compiled loop against the torch ops, on
    W divided by a row scaling, rows weighted, a short last block and an all-zero column included.
    Only the order of the float32 sums differs, so within 1e-6 relative."""
    from dfq_onnx.quant import transforms

    gen = torch.Generator().manual_seed(3)
    k, n = 200, 50  # 200 = 6 blocks of 32 + 8 rows, 1 block of 128 + 72; 50 = 3 tiles of 16 columns + 2
    w = torch.randn(k, n, generator=gen) * torch.rand(k, 1, generator=gen).mul(4)
    w[:, 5] = 0.0
    w = w if layout == "rows" else w.t().contiguous().t()  # [N, K] storage read as [K, N], as the graph holds it
    a = torch.rand(k, generator=gen) + 0.25
    weight = torch.rand(k, generator=gen) * a * a
    ref = transforms.rounding_error_reference(w / a.unsqueeze(1), fmt, weight)
    got = transforms.rounding_error(w, fmt, weight, divisor=a)
    assert got == pytest.approx(ref, rel=1e-6)
    assert transforms.rounding_error(w, fmt, None) == pytest.approx(transforms.rounding_error_reference(w, fmt, None), rel=1e-6)


@pytest.mark.parametrize("fmt", FORMATS, ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS])
def test_compiled_dequantize_equals_the_torch_ops(fmt):
    """Every element of the compiled dequantization equals (q - z) * s in torch's float32 ops, bit for
    bit, with a short last block (its padded rows dropped) and fp16-representable scales."""
    gen = torch.Generator().manual_seed(5)
    k, n = 200, 37
    w = torch.randn(k, n, generator=gen) * torch.rand(1, n, generator=gen).mul(3)
    q = grid.rtn(w, fmt, torch.float16)
    got, ref = q.dequantize(), q.dequantize_reference()
    assert got.shape == ref.shape == (k, n)
    assert torch.equal(got, ref)
    assert (got - w).abs().max() < (w.abs().max() / (1 << (fmt.bits - 1)))  # the codes were read, not zeros


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS])
def test_compiled_rtn_equals_the_torch_ops(fmt, scale_dtype, layout):
    """Round-to-nearest compiled gives the torch ops' codes, scales and zero points bit for bit (both
    are ORT's arithmetic): a short last block, an all-zero column, one-signed columns, grid ties."""
    gen = torch.Generator().manual_seed(7)
    k, n = 200, 37
    w = torch.randn(k, n, generator=gen) * torch.rand(1, n, generator=gen).mul(3)
    w[:, 3] = 0.0
    w[:, 4] = w[:, 4].abs()
    w[:, 5] = -w[:, 5].abs()
    w[:, 6] = torch.round(w[:, 6] * 2) / 2  # values on a grid: rounding ties
    w = w if layout == "rows" else w.t().contiguous().t()
    got, ref = grid.rtn(w, fmt, scale_dtype), grid.rtn_reference(w, fmt, scale_dtype)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.scales, ref.scales)
    assert (got.zero_points is None) == (ref.zero_points is None) == fmt.symmetric
    assert fmt.symmetric or torch.equal(got.zero_points, ref.zero_points)


def test_compiled_float16_scale_rounding_is_numpys_cast():
    """Scales stored as float16 are rounded on the float32 bit pattern in the compiled loops: equal to
    numpy's float16 cast on every float16 value, its neighbours, the midpoints between float16
    values (ties to even), subnormals, overflow to infinity and a random sample of float32 bits."""
    from numba import njit

    from dfq_onnx.quant import block_scales

    @njit
    def rounded(xs, out):
        for i in range(xs.shape[0]):
            out[i] = block_scales.to_scale_dtype(xs[i], True)

    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = np.sort(halves[np.isfinite(halves)])
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)
    sample = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    xs = np.concatenate([halves, mids, *(np.nextafter(v, np.float32(s * np.inf)) for v in (halves, mids) for s in (1, -1)),
                         sample[np.isfinite(sample)], np.float32([65519.99, 65520.0, -65520.0, 3.4e38])])  # fmt: skip
    out = np.empty_like(xs)
    rounded(xs, out)
    with np.errstate(over="ignore"):
        assert np.array_equal(out.view(np.uint32), xs.astype(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt", FORMATS, ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS])
def test_blocks_in_vector_lanes_get_the_scales_each_gets_alone(fmt):
    """The GPTQ loops search 16 columns' block scales side by side: each lane's scale and zero point
    equal those of its block searched alone (width 1), whatever the other lanes hold."""
    from dfq_onnx.quant import block_scales, scales

    rng = np.random.default_rng(1)
    bs, lanes = fmt.block_size, block_scales.LANES
    blocks = (rng.standard_normal((bs, lanes)) * rng.uniform(0.01, 3, lanes)).astype(np.float32)
    blocks[:, 3] = 0.0
    blocks[:, 4] = np.abs(blocks[:, 4])
    blocks[:, 5] = np.round(blocks[:, 5] * 4) / 4
    importance = rng.uniform(0.0, 2.0, bs).astype(np.float32)
    ratios = (np.asarray(scales.SYMMETRIC_RATIOS, np.float32), np.asarray(scales.ASYMMETRIC_RATIOS, np.float32))
    qmax = np.float32(grid.grid_max(fmt.bits))
    work = np.empty((5, block_scales.MAX_CANDIDATES, lanes), np.float32)
    for half in (False, True):
        together = np.zeros((2, lanes), np.float32)
        block_scales.lane_params(blocks, importance, lanes, qmax, fmt.symmetric, half, True, *ratios, 3, work, together[0], together[1])
        for lane in range(lanes):
            alone = np.zeros((2, lanes), np.float32)
            single = np.zeros_like(blocks)
            single[:, 0] = blocks[:, lane]
            block_scales.lane_params(single, importance, 1, qmax, fmt.symmetric, half, True, *ratios, 3, work, alone[0], alone[1])
            assert together[:, lane].tobytes() == alone[:, 0].tobytes(), (lane, half)


@pytest.mark.parametrize("fmt", FORMATS, ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS])
def test_search_without_gptq_is_the_weighted_torch_search(fmt):
    """With GPTQ off, a site's scales are searched under H's diagonal by the compiled loops (no row
    moves: no feedback), as the torch search weights them; a dead input (zero diagonal) included."""
    from dfq_onnx.config import MethodConfig
    from dfq_onnx.quant import scales
    from dfq_onnx.quant.site import Rounding, round_weight

    w, h = problem(256, 80, seed=fmt.bits + 3 * fmt.block_size)
    diag = h.diag.clone()
    diag[7] = 0.0
    h = rounding.LowRank(diag, torch.zeros_like(diag))
    got = round_weight(w, h, torch.float16, Rounding(fmt, MethodConfig(gptq=False, scale_search=True)))
    blocks = grid.to_blocks(w, fmt.block_size)
    s, z = scales.search(blocks, fmt, grid.to_blocks(diag.reshape(-1, 1), fmt.block_size), torch.float16)
    ref = grid.Quantized(grid.quantize_blocks(blocks, s, z, fmt), s, z, w.shape[0], fmt)
    live = diag > 0
    moved = (got.dequantize()[live] - ref.dequantize()[live]).abs() > 1e-3 * w.abs().max()  # a code, not a scale's ulp
    assert moved.float().mean().item() <= MAX_CODE_MISMATCH
    loss_ref = rounding.weighted_error(w, ref.dequantize(), h.dense())
    loss_got = rounding.weighted_error(w, got.dequantize(), h.dense())
    assert abs(loss_got / loss_ref - 1) <= MAX_LOSS_GAP, (loss_got, loss_ref)
    # Not vacuous: min/max round-to-nearest is worse under this H (by 1.6% at 8 bits, more below).
    assert loss_got < 0.99 * rounding.weighted_error(w, grid.rtn(w, fmt, torch.float16).dequantize(), h.dense())
