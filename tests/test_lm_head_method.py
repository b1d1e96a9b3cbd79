"""--lm-head int4|int8 with the method: the lm_head is rounded by GPTQ under the statistics at the
final norm's output, column chunk by column chunk, and the tied embedding reads the same table."""

from __future__ import annotations

import json

import pytest
import torch

from dfq_onnx import methods
from dfq_onnx.cli import main
from dfq_onnx.config import MethodConfig, QuantFormat
from dfq_onnx.quant import rounding, site


def test_chunks_give_the_bytes_of_one_pass(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(64, 300) * torch.rand(64, 1) * 3
    h = rounding.LowRank(torch.rand(64) + 0.1, torch.randn(64))
    how = site.Rounding(QuantFormat(bits=4, block_size=32, symmetric=False), MethodConfig())
    whole = methods.head_rounding(w, h, torch.float32, how)
    monkeypatch.setattr(methods, "HEAD_CHUNK", 7)  # 43 chunks, the last one short
    chunked = methods.head_rounding(w, h, torch.float32, how)
    assert torch.equal(whole[0].codes, chunked[0].codes) and torch.equal(whole[0].scales, chunked[0].scales)
    assert torch.equal(whole[0].zero_points, chunked[0].zero_points)
    assert chunked[1] == pytest.approx(whole[1], rel=1e-6)  # float32 sums, chunk by chunk and chunked[1] <= chunked[2]


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_lm_head_by_the_method_beats_round_to_nearest(tiny_family, tmp_path, family):
    model = tiny_family(family, "genai-fp32")
    out = {}
    for method in ("cafeq", "rtn"):
        out[method] = tmp_path / f"{method}.onnx"
        # --verify compare: the written lm_head (and the tied embedding) compute the method's dequantized weights
        assert main(["optimize", str(model), "-o", str(out[method]), "--lm-head", "int4", "--method", method, "--quiet"]) == 0
    report = json.loads((tmp_path / "cafeq.report.json").read_text())
    head = next(s for s in report["sites"] if s["role"] == "lm_head")
    assert "gptq" in head["transforms"] and head["rel_error"] < head["rtn_rel_error"]
    assert "fidelity" in report["verification"]["checks"]
    assert report["structure"]["embedding"]["tied"] == (family == "llama-tied")
