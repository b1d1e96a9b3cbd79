"""The low-rank GPTQ path (H = diag(d) + u u^T, O(K N) time, no K x K matrix), which rounds nearly
every production linear, is GPTQ itself: on the same H it makes the dense path's codes.

In exact arithmetic the two are the same algorithm: the dense path feeds each row's rounding error
forward through the Cholesky factor of H^-1; for a diagonal-plus-rank-one H that update is, by
Sherman-Morrison, the one the low-rank path applies along u / d. Both use the same damping (when
K is whole blocks: see below), the same scale search and the same rounding, so they give the same
codes and scales. In float32 the weights a row is rounded from differ by round-off (~K eps32 of
the value, ~1e-4 of a grid step here), so a code can differ only where the value sits that close
to a rounding boundary (or a scale search within that close to a tie): a handful of codes in 10^4.
Measured over 4 seeds x these 8 settings: at most 2.4e-4 of the codes differ and the dequantized
weights differ by at most 2.1e-3 of the loss, in the loss's own metric. The limits below keep a 4-5x
margin; each planted bug tried in the low-rank path (update direction, sign, Sherman-Morrison
denominator, its off-by-one tail sum, damping, scales chosen before the feedback, scale-search
weights) exceeded them by 4x or more in at least one setting.
"""

from __future__ import annotations

import pytest
import torch

from dfq_onnx.config import QuantFormat
from dfq_onnx.quant import grid, rounding

MAX_CODE_MISMATCH = 1e-3  # fraction of codes
MAX_WEIGHT_GAP = 1e-2  # tr(dW^T H dW) of the two dequantized weights, relative to the dense path's loss
MAX_LOSS_GAP = 1e-3  # |loss(low rank) / loss(dense) - 1|; measured <= 2.6e-4

FORMATS = [QuantFormat(4, 32, True), QuantFormat(3, 64, False), QuantFormat(2, 16, False), QuantFormat(4, 128, True)]


def problem(k: int, n: int, seed: int) -> tuple[torch.Tensor, rounding.LowRank]:
    """W with a few outlier rows, and an H whose mean direction couples the rows as strongly as its
    diagonal weighs them (|u|^2 / d ~ 4 per row), so the error feedback is far from plain rounding."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g)
    w[torch.randperm(k, generator=g)[:4]] *= 8
    return w, rounding.LowRank(torch.rand(k, generator=g) + 0.1, torch.randn(k, generator=g) * 2)


def compare(w: torch.Tensor, h: rounding.LowRank, fmt: QuantFormat, search_scales: bool, damp: float = 0.01) -> None:
    low = rounding.gptq(w, h, fmt, search_scales=search_scales, damp=damp)  # a LowRank H: the low-rank path
    dense_h = h.dense()
    dense = rounding.gptq(w, dense_h, fmt, search_scales=search_scales, damp=damp)  # a [K, K] H: the dense path
    loss_dense = rounding.weighted_error(w, dense.dequantize(), dense_h)
    loss_low = rounding.weighted_error(w, low.dequantize(), dense_h)
    # Not vacuous: the feedback under this H lands far from round-to-nearest (measured 0.08 to 0.31 of its loss).
    assert loss_dense < 0.5 * rounding.weighted_error(w, grid.rtn(w, fmt).dequantize(), dense_h)
    mismatch = (low.codes != dense.codes).float().mean().item()
    assert mismatch <= MAX_CODE_MISMATCH, mismatch
    gap = rounding.weighted_error(low.dequantize(), dense.dequantize(), dense_h) / loss_dense
    assert gap <= MAX_WEIGHT_GAP, gap
    assert abs(loss_low / loss_dense - 1) <= MAX_LOSS_GAP, (loss_low, loss_dense)


@pytest.mark.parametrize("search_scales", [False, True], ids=["minmax", "search"])
@pytest.mark.parametrize(
    "seed,fmt", list(enumerate(FORMATS)), ids=[f"int{f.bits}-b{f.block_size}-{'sym' if f.symmetric else 'asym'}" for f in FORMATS]
)
def test_low_rank_gptq_makes_the_dense_paths_codes(seed, fmt, search_scales):
    w, h = problem(256, 64, seed)
    compare(w, h, fmt, search_scales)


@pytest.mark.parametrize("search_scales", [False, True], ids=["minmax", "search"])
def test_low_rank_gptq_pads_k_like_the_dense_path(search_scales):
    """K = 200 is not whole blocks of 32: both paths pad it with rows of zero weight that H does not
    couple. Undamped, because the dense path averages its damping over the padding rows too
    (the low-rank path over the K real rows), which is a different H, not a different algorithm."""
    w, h = problem(200, 48, seed=7)
    compare(w, h, QuantFormat(4, 32, True), search_scales, damp=0.0)
