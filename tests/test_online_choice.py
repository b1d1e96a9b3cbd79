"""The online-rotation choice decides from a sample of columns where the sample is clear, and
otherwise rounds the group both ways whole: the same decision as the whole comparison."""

from __future__ import annotations

import pytest
import torch

from dfq_onnx.config import MethodConfig, QuantFormat
from dfq_onnx.quant import online, rounding, site, transforms
from dfq_onnx.quant.site import Rounding, SiteTransform

FMT4 = QuantFormat(4, 32, True)
K, N = 512, 96


def weights(outlier_rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(K, N, generator=g) * 0.02
    w[torch.randperm(K, generator=g)[:outlier_rows]] *= 12.0  # loud input channels: what a rotation spreads
    return w


def prior(seed: int = 4) -> rounding.LowRank:
    g = torch.Generator().manual_seed(seed)
    return rounding.LowRank(torch.rand(K, generator=g) + 0.5, 0.3 * torch.randn(K, generator=g))


class Group:
    """make() for one linear, as mlp.py builds it, recording which roundings were asked for."""

    def __init__(self, w, h, how):
        self.w, self.h, self.how, self.calls = w, h, how, []

    def __call__(self, t=None, tag=None, columns=None, sample=None):
        self.calls.append(("rotated" if t is not None else "plain", "columns" if columns else "whole"))
        w = self.w if columns is None else self.w[:, ::columns].contiguous()
        return {"w": site.round_site(w, self.h, torch.float32, self.how, SiteTransform(online=t), [tag] if tag else [], sample)}


@pytest.mark.parametrize("rotate", [False, True])
def test_sample_error_is_the_error_of_those_columns_rounded_alone(rotate):
    """GPTQ and the scale search treat columns independently and the proxy sums over them, so the
    error a whole rounding leaves on every 4th column is that of rounding those columns alone."""
    w, h, how = weights(8), prior(), Rounding(FMT4, MethodConfig())
    tf = SiteTransform(online=transforms.hadamard(32) if rotate else None)
    whole = site.round_site(w, h, torch.float32, how, tf, [], sample=4)
    alone = site.round_site(w[:, ::4].contiguous(), h, torch.float32, how, tf, [])
    assert whole.sample_error == pytest.approx(alone.error, rel=1e-5)
    assert 0.1 * whole.error < whole.sample_error < 0.5 * whole.error  # a quarter of the columns, not all


def test_a_clear_sample_keeps_the_rotation_without_the_whole_unrotated_rounding():
    w, h, how = weights(8), prior(), Rounding(FMT4, MethodConfig())
    make = Group(w, h, how)
    chosen_online = {}
    chosen = online.choose_online(make, None, K, "cpu", how, chosen_online)
    assert ("plain", "whole") not in make.calls and ("plain", "columns") in make.calls
    plain = make()["w"]  # the whole comparison agrees: the rotation pays by far more than the margin
    assert chosen["w"].error < (1 - how.config.online_min_gain - online.SAMPLE_MARGIN) * plain.error
    assert set(chosen_online) == {"w"} and "online-hadamard32" in chosen["w"].transforms


def test_where_the_rotation_does_not_pay_both_are_rounded_whole_and_compared():
    """Gaussian weights without loud channels and an even prior: a rotation changes little, so the
    sample cannot decide; the unrotated group is rounded whole and kept (the exact rule)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(K, N, generator=g) * 0.02
    h = rounding.LowRank(torch.ones(K), torch.zeros(K))
    how = Rounding(FMT4, MethodConfig())
    make = Group(w, h, how)
    chosen_online = {}
    chosen = online.choose_online(make, None, K, "cpu", how, chosen_online)
    assert ("plain", "whole") in make.calls
    rotated = Group(w, h, how)(transforms.hadamard(32), "t")["w"]
    plain = Group(w, h, how)()["w"]
    keep = rotated.error < (1 - how.config.online_min_gain) * plain.error
    assert not keep and chosen_online == {}
    assert torch.equal(chosen["w"].quantized.codes, plain.quantized.codes)
