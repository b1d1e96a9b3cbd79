"""The token distribution the prior starts from (method.token_prior): the weighted embedding moments
are the weighted mean and covariance, the self distribution is the model's own next-token softmax at
the prior's mean final state, and the default recipe uses it on post-normed tiny models (Gemma 2), not on
pre-norm ones (Llama), in two export styles."""

from __future__ import annotations

import dataclasses

import pytest
import tiny_models
import torch

from dfq_onnx.run import prior
from dfq_onnx.config import DfqError, TokenPrior, load_recipe, recipe_from_dict
from dfq_onnx.graph import load
from dfq_onnx.graph.sites import find_sites
from dfq_onnx.quant import stats
from dfq_onnx.run.weights import WeightReader


def _table(vocab: int = 500, hidden: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 + torch.randn(vocab, hidden, generator=g) * torch.linspace(0.1, 2.0, hidden)  # a large shared mean


def _zipf(vocab: int, seed: int = 1) -> torch.Tensor:
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    return 1.0 / (1.0 + order.double())


def _exact(table: torch.Tensor, w: torch.Tensor):
    t = table.double()
    w = w.double() / w.sum()
    mean = w @ t
    return mean, (t * w[:, None]).t() @ t - torch.outer(mean, mean)


@pytest.mark.parametrize("centered", [False, True])
def test_weighted_embedding_moments_are_the_weighted_mean_and_covariance(centered):
    """Every row within EXACT_ROWS: the covariance is exact to float32 products (1e-5 relative)."""
    table, w = _table(), _zipf(500)
    center = table.mean(0) if centered else None
    got = stats.embedding_moments(iter(table.split(64)), 2.0, 500, weights=w, center=center)
    mean, cov = _exact(table, w)
    assert torch.allclose(got.mean, 2.0 * mean, rtol=1e-6)
    assert float((got.cov - 4.0 * cov).norm() / (4.0 * cov).norm()) < 1e-5


def test_weighted_covariance_from_a_sample_of_the_rare_rows(monkeypatch):
    """Past EXACT_ROWS the less probable rows enter one in `stride`, weighted by the stride: with the
    top 50 rows exact the estimate stays within 2% (of a covariance that differs from the uniform
    table's by far more), and the mean is still exact."""
    monkeypatch.setattr(stats, "EXACT_ROWS", 50)
    monkeypatch.setattr(stats, "COVARIANCE_ROWS", 100)  # stride 5 over 500 rows
    table, w = _table(), _zipf(500) ** 2
    got = stats.embedding_moments(iter(table.split(64)), 1.0, 500, weights=w, center=table.mean(0))
    mean, cov = _exact(table, w)
    _, uniform = _exact(table, torch.ones(500))
    assert torch.allclose(got.mean, mean, rtol=1e-6)
    assert float((got.cov - cov).norm() / cov.norm()) < 0.02
    assert float((uniform - cov).norm() / cov.norm()) > 0.1


def test_token_distribution_is_the_softmax_at_the_mean_final_state():
    g = torch.Generator().manual_seed(0)
    k, vocab = 16, 301
    final = stats.Moments(torch.randn(k, generator=g, dtype=torch.float64), torch.rand(k, generator=g, dtype=torch.float64))
    gain, head = torch.rand(k, generator=g) + 0.5, torch.randn(k, vocab, generator=g)
    got = stats.token_distribution(final, gain, iter(head.split(64, dim=1)))
    h = stats.rms_norm(final, gain).mean.float()
    assert torch.allclose(got, torch.softmax((h @ head).double(), 0), atol=1e-9)
    assert float(got.sum()) == pytest.approx(1.0)


def _starts(model_path, token_prior: TokenPrior | None = None):
    """(the first layer's statistics under the default recipe, or with `token_prior`; the uniform start;
    the self distribution; the embedding table; its scale)."""
    model = load.load_model(model_path)
    sites = find_sites(model)
    recipe = load_recipe("cafeq-int4-cuda")
    with_prior = lambda p: dataclasses.replace(recipe, method=dataclasses.replace(recipe.method, token_prior=p))  # noqa: E731
    reader = WeightReader(model.graph, sites, "cpu")
    chosen = recipe if token_prior is None else with_prior(token_prior)
    uniform = prior.initial_statistics(reader, with_prior(TokenPrior.UNIFORM))
    emb = sites.embedding
    table = torch.cat([torch.as_tensor(r, dtype=torch.float32) for r in load.iter_rows(model.graph.initializers[emb.initializer].const_value, emb.transposed, 64)])
    return prior.initial_statistics(reader, chosen), uniform, prior.token_weights(reader, chosen, uniform), table, sites.embedding_scale


def _assert_weighted_start(start, uniform, weights, table, scale):
    mean, cov = _exact(table, weights)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights.max() / weights.min()) > 1.05  # not the uniform distribution (random tiny weights predict flatly)
    assert torch.allclose(start.mean, mean * scale, rtol=1e-5, atol=1e-6 * float(mean.abs().max() * scale))
    assert float((start.cov - cov * scale * scale).norm() / (cov * scale * scale).norm()) < 1e-4
    assert float((start.mean - uniform.mean).norm() / uniform.mean.norm()) > 1e-3


@pytest.mark.parametrize("style", ["dynamo", "genai-fp32"])
def test_post_normed_model_starts_from_its_own_token_distribution(tiny_family, style):
    """Gemma 2 (post-norms): by default the first layer's statistics are the embedding rows weighted by
    the model's next-token probabilities at the prior's mean final state."""
    assert load_recipe("cafeq-int4-cuda").method.token_prior == TokenPrior.POST_NORM
    _assert_weighted_start(*_starts(tiny_family("gemma2", style)))


@pytest.mark.parametrize("style", ["dynamo", "genai-fp32"])
def test_pre_norm_model_starts_uniform_unless_the_recipe_says_self(tiny_family, style):
    """Llama (pre-norm): the default keeps the uniform start; token_prior = "self" weighs it there too."""
    model = tiny_family("llama", style)
    start, uniform, *_ = _starts(model)
    assert torch.equal(start.mean, uniform.mean) and torch.equal(start.cov, uniform.cov)
    _assert_weighted_start(*_starts(model, TokenPrior.SELF))


def test_a_bad_head_weight_is_named_by_the_token_pass(tiny, tmp_path, capsys, monkeypatch):
    """The token pass reads every layer and the lm_head before any rounding: on a model too large for
    the up-front check a NaN there ends the run with the unit, the pass and the weight named, and
    nothing written."""
    from dfq_onnx.run import pipeline
    from dfq_onnx.front.cli import main

    monkeypatch.setattr(pipeline, "VERIFY_AUTO_LIMIT", 0)  # the large-model path: weights checked as read
    model, name = tiny_models.with_nan_in_head(tiny("dynamo"), tmp_path / "in")
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    assert main(["optimize", str(model), "-o", str(out), "--verify", "none", "--quiet"]) != 0
    assert f"lm_head/embedding (the prior's token pass): weight '{name}' contains NaN" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []


def test_recipe_rejects_an_unknown_token_prior():
    with pytest.raises(DfqError, match="token_prior"):
        recipe_from_dict({"method": {"token_prior": "unigram"}}, "test")
