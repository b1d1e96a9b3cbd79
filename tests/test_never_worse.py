"""Never worse than round-to-nearest, per site: every site's final proxy is at most that of plain
round-to-nearest of its original weight under the same statistics."""

from __future__ import annotations

import json

import pytest
import torch

from dfq_onnx.cli import main
from dfq_onnx.config import MethodConfig, QuantFormat
from dfq_onnx.quant import grid
from dfq_onnx.quant.geometry import LayerResult
from dfq_onnx.quant.layer import RTN_TOLERANCE, never_worse_than_rtn
from dfq_onnx.quant.site import Rounding, SiteOutcome


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_every_site_at_most_round_to_nearest(tiny_family, tmp_path, family, bits):
    out = tmp_path / "q.onnx"
    sym = ["--symmetric"] if bits == 4 else ["--asymmetric"]
    assert main(["optimize", str(tiny_family(family, "genai-fp32")), "-o", str(out), "--bits", str(bits), *sym, "--verify", "none", "--quiet"]) == 0
    report = json.loads(out.with_name("q.report.json").read_text())
    for site in report["sites"]:
        assert site["rel_error"] <= site["rtn_rel_error"] * (1 + RTN_TOLERANCE), site


def _outcome(error: float, rtn_error: float) -> SiteOutcome:
    q = grid.rtn(torch.ones(32, 4), QuantFormat())
    return SiteOutcome(q, error, rtn_error, 1.0, ["norm-diag"])


def test_a_site_worse_than_rtn_redoes_the_sublayer_without_transforms():
    calls = []

    def sublayer(layer, how, result, residual):
        calls.append(how.config)
        transformed = how.config.diagonal
        result.sites["k"] = _outcome(2.0 if transformed else 0.5, 1.0)  # the shared scaling hurts k
        result.sites["q"] = _outcome(0.1 if transformed else 0.6, 1.0)
        if transformed:
            result.gains["norm"] = torch.ones(4)
        return "after"

    result = LayerResult(sites={})
    assert never_worse_than_rtn(sublayer, None, Rounding(QuantFormat(), MethodConfig()), result, None) == "after"
    assert [c.diagonal for c in calls] == [True, False] and calls[1].online == () and not calls[1].vo_transform
    assert result.sites["k"].error == 0.5 and result.sites["q"].error == 0.6
    assert "norm" not in result.gains  # the scaling of the discarded try is not folded
    assert "no-transform-fallback" in result.sites["k"].transforms


def test_forced_transforms_are_kept():
    calls = []

    def sublayer(layer, how, result, residual):
        calls.append(how.config)
        result.sites["k"] = _outcome(2.0, 1.0)

    never_worse_than_rtn(sublayer, None, Rounding(QuantFormat(), MethodConfig(force_transforms=True)), LayerResult(sites={}), None)
    assert len(calls) == 1
