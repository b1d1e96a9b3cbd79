"""tools/research/tie_share.py counts the weights that round-to-nearest sends to a code by its tie rule alone:
planted half-steps are counted, integer steps and random weights are not."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dfq_onnx.config import QuantFormat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "research"))

import tie_share  # noqa: E402


def test_planted_half_steps_are_ties_and_whole_steps_are_not():
    s = 0.0078125  # a power of two: w / s is exact in float32
    sym = QuantFormat(4, 32, True)
    block = torch.tensor([-8.0] + [j - 7.5 for j in range(15)] + [j - 7.0 for j in range(16)]) * s  # scale = s
    w = block.reshape(32, 1).repeat(1, 3)  # W[K, N]: three columns of the same block
    assert tie_share.tie_count(w, sym) == 15 * 3
    asym = QuantFormat(2, 32, False)  # range [-3s, 0] over 3 steps: scale s, zero point 3
    block = torch.tensor([-3.0, 0.0] + [-0.5, -1.5, -2.5] * 10) * s
    assert tie_share.tie_count(block.reshape(32, 1), asym) == 30


def test_random_weights_have_almost_no_ties():
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    for fmt in (QuantFormat(4, 32, True), QuantFormat(3, 32, False)):
        assert tie_share.tie_count(w, fmt) <= 2


def test_bad_format_is_a_clear_error():
    try:
        tie_share.parse_formats("4-32-sym")
    except SystemExit as err:
        assert "BITS:BLOCK:sym|asym" in str(err)
    else:
        raise AssertionError("a malformed format was accepted")
