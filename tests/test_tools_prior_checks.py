"""The analysis tools' covariance helpers: gap_split's shrunk covariance spans diag + mean (0) to the
dense second moment (1), and prior_by_role's structure score is 1 for the text's own directions and
near chance for unrelated ones."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools" / "research"))

import gap_split  # noqa: E402
import prior_by_role  # noqa: E402


def _moments(seed: int, k: int = 64, rank: int = 4):
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(k, rank, generator=g, dtype=torch.float64) * 3
    x = torch.randn(4096, rank, generator=g, dtype=torch.float64) @ factors.T + torch.randn(4096, k, generator=g, dtype=torch.float64)
    x = x + torch.randn(k, generator=g, dtype=torch.float64)  # a mean
    return x.mean(0), x.T @ x / x.shape[0]


def test_shrunk_covariance_spans_diagonal_to_dense():
    mean, second = _moments(0)
    var = torch.diagonal(second) - mean * mean
    assert torch.allclose(gap_split.shrunk_covariance(mean, second, 1.0), second)
    assert torch.allclose(gap_split.shrunk_covariance(mean, second, 0.0), torch.diag(var) + torch.outer(mean, mean))
    half = gap_split.shrunk_covariance(mean, second, 0.5)
    assert torch.allclose(torch.diagonal(half), torch.diagonal(second))  # the variances stay exact
    off = ~torch.eye(64, dtype=torch.bool)
    assert torch.allclose((half - torch.outer(mean, mean))[off], 0.5 * (second - torch.outer(mean, mean))[off])


def test_structure_score_sees_the_same_and_unrelated_directions(capsys):
    class Role:
        value = "q"

    class Linear:
        role, layer = Role(), 0

    class Sites:
        linears = {"q": Linear()}

    real = {"x": _moments(1)}
    same = {"q": (*_moments(1), False)}
    unrelated = {"q": (*_moments(2), False)}
    prior_by_role.structure_check(Sites(), same, real, {"q": "x"}, 4)
    assert capsys.readouterr().out.splitlines()[1].split()[1] == "1.00"
    prior_by_role.structure_check(Sites(), unrelated, real, {"q": "x"}, 4)
    line = capsys.readouterr().out.splitlines()[1].split()
    assert float(line[1]) < 0.5 and abs(float(line[1]) - float(line[-1].rstrip(")"))) < 0.2, line


def test_token_prior_variants_weigh_the_rows_as_named(tiny):
    """prior_by_role's variants on the tiny Gemma 2: `self/1` is `self`, `self/T` raises it to 1/T,
    `rank` is Zipf over the vocabulary index, and each changes the propagated statistics."""
    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    model = load.load_model(tiny("dynamo"))
    sites = find_sites(model)
    weights, priors = {}, {}
    for name in ("self", "self/1", "self/0.5", "rank"):
        seen: list[torch.Tensor] = []
        priors[name] = prior_by_role.prior_under(model, sites, name, None, seen)
        weights[name] = seen[0]
    assert torch.allclose(weights["self/1"], weights["self"])
    sharp = weights["self"] ** 2
    assert torch.allclose(weights["self/0.5"], sharp / sharp.sum())
    index = torch.arange(sites.embedding.vocab, dtype=torch.float64)
    zipf = 1.0 / (index + prior_by_role.RANK_OFFSET)
    assert torch.allclose(weights["rank"], zipf / zipf.sum())
    first = next(iter(priors["self"]))
    for name in ("self/0.5", "rank"):
        assert not torch.allclose(priors[name][first][0], priors["self"][first][0]), name
