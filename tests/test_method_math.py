"""The method's math on small random matrices with planted outlier channels (the regime of real LLM weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dfq_onnx.config import DiagonalPrior, MethodConfig, QuantFormat, recipe_from_dict
from dfq_onnx.errors import DfqError
from dfq_onnx.quant import grid, products, rounding, scales, site, stats, transforms
from dfq_onnx.quant.site import Rounding, SiteTransform
from dfq_onnx.quant.value_output import Pair, round_pair

FMT4 = QuantFormat(4, 32, True)
FMT3 = QuantFormat(3, 32, True)


def planted(k: int, n: int, seed: int = 0, outlier_rows: int = 3, outlier_cols: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.02
    rows = torch.randperm(k, generator=g)[:outlier_rows]
    cols = torch.randperm(n, generator=g)[:outlier_cols]
    w[rows] *= 12.0  # input channels with large weights (what RTN's block scales suffer from)
    w[:, cols] *= 6.0
    return w


def spd(k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / math.sqrt(k)
    scale = torch.exp(torch.randn(k, generator=g))
    return (a.t() @ a + 0.1 * torch.eye(k)) * torch.outer(scale, scale)


def rtn_error(w, h, fmt=FMT4):
    return rounding.weighted_error(w, grid.fake_quant(w, fmt), h)


@pytest.mark.parametrize("fmt", [FMT4, FMT3, QuantFormat(4, 128, False), QuantFormat(2, 32, False)])
def test_scale_search_never_worse_and_better_on_outliers(fmt):
    w = planted(256, 48)
    h = torch.diagonal(spd(256))
    blocks = grid.to_blocks(w, fmt.block_size)
    weight = grid.to_blocks(h.view(-1, 1), fmt.block_size)
    s, z = scales.search(blocks, fmt, weight)
    q = grid.Quantized(grid.quantize_blocks(blocks, s, z, fmt), s, z, 256, fmt)
    per_block = scales.block_error(blocks, q.codes, q.scales, q.zero_point_values().float(), weight)
    rtn = grid.rtn(w, fmt)
    rtn_block = scales.block_error(blocks, rtn.codes, rtn.scales, rtn.zero_point_values().float(), weight)
    assert bool((per_block <= rtn_block * (1 + 1e-6) + 1e-12).all())  # block by block
    assert per_block.sum() < 0.9 * rtn_block.sum()


def test_gptq_with_identity_hessian_is_round_to_nearest():
    w = planted(200, 40)
    for fmt in (FMT4, QuantFormat(3, 64, False), QuantFormat(2, 16, True)):
        q = rounding.gptq(w, torch.eye(200), fmt, search_scales=False)
        r = grid.rtn(w, fmt)
        assert torch.equal(q.codes.reshape(40, -1)[:, :200], r.codes.reshape(40, -1)[:, :200])
        assert torch.equal(q.scales, r.scales)
        if r.zero_points is not None:
            assert torch.equal(q.zero_points, r.zero_points)


@pytest.mark.parametrize("fmt", [FMT4, FMT3])
def test_gptq_lowers_the_hessian_weighted_error(fmt):
    w, h = planted(256, 32), spd(256)
    q = rounding.gptq(w, h, fmt)
    assert rounding.weighted_error(w, q.dequantize(), h) < 0.8 * rtn_error(w, h, fmt)


def test_norm_diagonal_transform_lowers_the_proxy():
    """A folded input scaling shared by q/k/v-like consumers lowers their joint weighted error."""
    ws = [planted(128, 64, seed=i) for i in range(3)]
    h = torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(5)) * 1.5)
    choice = transforms.search_diagonal(ws, h, FMT3)
    assert not choice.is_identity
    assert choice.error < 0.95 * sum(transforms.rounding_error(w, FMT3, h) for w in ws)
    # Exact without rounding: (x * a) (W / a) = x W.
    x = torch.randn(7, 128)
    assert torch.allclose((x * choice.a) @ (ws[0] / choice.a.unsqueeze(1)), x @ ws[0], atol=1e-5)


@pytest.mark.parametrize("fmt", [FMT4, FMT3, QuantFormat(4, 128, False), QuantFormat(2, 32, False)])
@pytest.mark.parametrize("seed", range(4))
def test_diagonal_search_from_a_column_sample_picks_the_exhaustive_best(fmt, seed):
    """The search scores every candidate on a sample of columns and only the close ones whole: it
    chooses what scoring every candidate whole chooses, with the same error."""
    ws = [planted(256, transforms.SAMPLE_MIN_COLUMNS, seed=seed + i, outlier_cols=8) for i in range(2)]
    h = torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(seed)) * (0.5 + seed / 2))
    choice = transforms.search_diagonal(ws, h, fmt)
    h_pos = h.clamp(min=h.min())
    spread = torch.stack([w.abs().amax(dim=1) for w in ws]).amax(0)
    best = None
    for alpha in transforms.ALPHAS:
        for beta in transforms.BETAS:
            a = h_pos ** (-alpha / 2) * spread**beta
            a = a / torch.exp(torch.log(a).mean())
            err = sum(transforms.rounding_error(w, fmt, h * a * a, divisor=a) for w in ws)
            if best is None or err < best[0]:
                best = (err, alpha, beta)
    assert (choice.error, choice.alpha, choice.beta) == best


@pytest.mark.parametrize("setting", list(DiagonalPrior))
def test_diagonal_whitens_by_the_prior_only_where_the_setting_trusts_it(setting):
    """Without post-norms the prior's per-channel importance is unreliable: the scaling must then come
    from the weights' spread alone (the prior only scores it); behind post-norms it whitens."""
    ws = [planted(128, 64, seed=i) for i in range(3)]
    priors = [torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(s)) * 1.5) for s in (5, 6)]
    how = Rounding(FMT3, MethodConfig(diagonal_prior=setting))
    for post_normed in (False, True):
        scalings = [site.diagonal_scaling(ws, rounding.LowRank(p, torch.zeros(128)), how, True, "norm-diag", post_normed)[0] for p in priors]
        trusted = setting == DiagonalPrior.ALWAYS or (setting == DiagonalPrior.POST_NORM and post_normed)
        if trusted:  # the planted prior makes whitening pay (test above): each prior gets its own scaling
            assert all(a is not None for a in scalings)
            assert not torch.allclose(scalings[0], scalings[1])
        else:  # only the spread candidates (r^beta, geometric mean 1) may be chosen, whatever the prior
            spread = torch.stack([w.abs().amax(dim=1) for w in ws]).amax(0)
            by_spread = spread**0.5 / torch.exp(torch.log(spread**0.5).mean())
            for a in scalings:
                assert a is None or torch.allclose(a, by_spread, rtol=1e-5), "whitened by an untrusted prior"


def test_diagonal_prior_is_read_from_a_recipe():
    assert recipe_from_dict({"method": {"diagonal_prior": "always"}}).method.diagonal_prior == DiagonalPrior.ALWAYS
    assert MethodConfig().diagonal_prior == DiagonalPrior.POST_NORM
    with pytest.raises(DfqError, match="diagonal_prior 'sometimes'"):
        recipe_from_dict({"method": {"diagonal_prior": "sometimes"}})


def test_up_down_diagonal_is_exact_and_lowers_down_error():
    up, down = planted(64, 128), planted(128, 64, seed=3)
    h = torch.exp(torch.randn(128, generator=torch.Generator().manual_seed(2)))
    choice = transforms.search_diagonal([down], h, FMT3)
    d = choice.a
    assert choice.error < transforms.rounding_error(down, FMT3, h)
    gate_act = torch.rand(5, 128)
    x = torch.randn(5, 64)
    ref = (gate_act * (x @ up)) @ down
    got = (gate_act * (x @ (up * d.unsqueeze(0)))) @ (down / d.unsqueeze(1))
    assert torch.allclose(got, ref, atol=1e-4)


def _pair_setup(seed=0, heads=4, kv=2, d=32, k=96, n=80, bias=None):
    g = torch.Generator().manual_seed(seed)
    w_v = torch.randn(k, kv * d, generator=g) * 0.05
    w_o = torch.randn(heads * d, n, generator=g) * 0.05
    w_o[torch.randperm(heads * d, generator=g)[:4]] *= 15.0  # outlier rows inside heads
    mean = torch.randn(k, generator=g, dtype=torch.float64)
    a = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    x = stats.Moments(mean, a.t() @ a + 0.1 * torch.eye(k, dtype=torch.float64))
    return Pair(x, w_v, w_o, heads, d, bias), heads, kv, d


def _value_bias(kv=2, d=32, seed=5, std=1.0):
    # Qwen 2's value biases are of the size of x V itself: they dominate the mean of o's input.
    return torch.randn(kv * d, generator=torch.Generator().manual_seed(seed)) * std


def test_value_bias_enters_the_pair_error_through_the_mean():
    """With V exact, z W_o - z O^ = z D: E||z D||^2 = tr(D^T Cov(z) D) + ||E[z] D||^2, E[z] = mean(x) V + b per head."""
    bias = _value_bias()
    pair, heads, kv, d = _pair_setup(seed=2, bias=bias)
    delta = 0.01 * torch.randn(pair.w_o.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    group = heads // kv
    cov_v = pair.w_v.double().t() @ pair.x.dense_cov() @ pair.w_v.double()
    mean_v = pair.x.mean @ pair.w_v.double() + bias.double()
    want = 0.0
    for h in range(heads):
        g = slice((h // group) * d, (h // group + 1) * d)
        dh = delta[h * d : (h + 1) * d]
        want += float(stats.ATTENTION_CONCENTRATION * (dh * (cov_v[g, g] @ dh)).sum())
    mean_z = torch.cat([mean_v[(h // group) * d : (h // group + 1) * d] for h in range(heads)])
    want += float(((mean_z @ delta) ** 2).sum())
    assert pair.error(pair.w_v, pair.w_o.double() + delta) == pytest.approx(want, rel=1e-9)


def test_pair_rounding_that_knows_the_value_bias_rounds_o_better():
    """O rounded for z's true mean (bias included) has a lower true pair error than O rounded as if b = 0."""
    how = Rounding(FMT3, MethodConfig())
    for seed in range(3):
        bias = _value_bias(seed=seed + 7)
        aware, *_ = _pair_setup(seed, bias=bias)
        blind, *_ = _pair_setup(seed)
        errors = []
        for pair in (aware, blind):
            qv, qo, _ = round_pair(pair, SiteTransform(), SiteTransform(), how, how, torch.float32, torch.float32)
            errors.append(aware.error(qv.dequantize(), qo.dequantize()))
        assert errors[0] < errors[1], errors


def test_value_output_transform_is_exact_and_can_lower_the_pair_error():
    pair, heads, kv, d = _pair_setup()
    t = transforms.hadamard(d)
    v2, o2 = transforms.apply_value_output(pair.w_v, pair.w_o, t)
    group = heads // kv
    for h in range(heads):  # the product V_g O_h of every query head is unchanged
        g = h // group
        ref = pair.w_v[:, g * d : (g + 1) * d] @ pair.w_o[h * d : (h + 1) * d]
        got = v2[:, g * d : (g + 1) * d] @ o2[h * d : (h + 1) * d]
        assert torch.allclose(got, ref, atol=1e-5)
    how = Rounding(FMT3, MethodConfig(vo_pairs=False, gptq=False, scale_search=False))
    plain = round_pair(pair, SiteTransform(), SiteTransform(), how, how, torch.float32, torch.float32)[2]
    tf_v = SiteTransform(col=torch.block_diag(*[t] * kv))
    tf_o = SiteTransform(row=torch.block_diag(*[t.t()] * heads))
    rotated = round_pair(pair, tf_v, tf_o, how, how, torch.float32, torch.float32)[2]
    assert rotated < plain  # incoherence spreads the planted outlier rows of O


def test_alternating_pair_rounding_never_raises_the_product_error():
    for seed in range(3):
        pair, *_ = _pair_setup(seed)
        rtn_pair = pair.error(grid.fake_quant(pair.w_v, FMT3), grid.fake_quant(pair.w_o, FMT3))
        errors = []
        for steps in (1, 2, 4):
            how = Rounding(FMT3, MethodConfig(alternations=steps))
            errors.append(round_pair(pair, SiteTransform(), SiteTransform(), how, how, torch.float32, torch.float32)[2])
        assert errors[1] <= errors[0] + 1e-9 and errors[2] <= errors[1] + 1e-9
        assert errors[0] < rtn_pair


@pytest.mark.parametrize("fmt", [QuantFormat(2, 32, True), FMT3])
def test_o_does_not_compensate_a_value_kept_in_float(fmt):
    """With V excluded (written in float) the model computes z W_o - z O^ with the float V: O must not
    be fitted to a rounded V that is never written. Its true pair error is then at most round-to-
    nearest's (O only), and the error the pair rounding reports is that true one."""
    how = Rounding(fmt, MethodConfig())
    for seed in range(3):
        pair, *_ = _pair_setup(seed)
        _, qo, reported = round_pair(pair, SiteTransform(), SiteTransform(), how, how, torch.float32, torch.float32, (True, False))
        true = pair.error(pair.w_v, qo.dequantize())
        assert reported == pytest.approx(true, rel=1e-9)
        assert true <= pair.error(pair.w_v, grid.fake_quant(pair.w_o, fmt)) * (1 + 1e-9)


def test_rope_rotation_preserves_scores():
    d, heads = 16, 2
    angles = torch.rand(heads, d // 2) * 6
    blocks = transforms.rope_rotation(angles, d)
    rot = blocks.dense(heads * d)
    q, k = torch.randn(5, heads * d), torch.randn(7, heads * d)

    def rope(x, theta):
        x = x.view(x.shape[0], heads, d)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * torch.cos(theta) - x2 * torch.sin(theta), x2 * torch.cos(theta) + x1 * torch.sin(theta)], -1)

    tq, tk = torch.rand(d // 2) * 3, torch.rand(d // 2) * 3
    ref = torch.einsum("ahd,bhd->hab", rope(q, tq), rope(k, tk))
    got = torch.einsum("ahd,bhd->hab", rope(q @ rot, tq), rope(k @ rot, tk))
    assert torch.allclose(got, ref, atol=1e-4)
    assert torch.allclose(rot @ rot.t(), torch.eye(heads * d), atol=1e-6)
    assert torch.allclose(blocks.right_of(q), q @ rot, atol=1e-6)  # the block product is the dense one


def test_statistics_match_monte_carlo():
    """Propagated moments of a norm, a linear map and a gated MLP agree with sampling."""
    g = torch.Generator().manual_seed(0)
    k, n = 24, 16
    mean = torch.randn(k, generator=g, dtype=torch.float64)
    a = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    x = stats.Moments(mean, a.t() @ a)
    w_g = torch.randn(k, n, generator=g) / math.sqrt(k)
    w_u = torch.randn(k, n, generator=g) / math.sqrt(k)
    samples = mean + torch.randn(200_000, k, generator=g, dtype=torch.float64) @ a
    lin = stats.linear(x, w_g)
    assert torch.allclose(lin.mean, (samples @ w_g.double()).mean(0), atol=0.02)
    assert torch.allclose(torch.diagonal(lin.cov), (samples @ w_g.double()).var(0), rtol=0.03)
    u = stats.gated_mlp_hidden(x, w_g, w_u, "gelu_tanh")
    gs, us = samples @ w_g.double(), samples @ w_u.double()
    sampled = 0.5 * gs * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gs + 0.044715 * gs**3))) * us
    assert torch.allclose(u.mean, sampled.mean(0), atol=0.02)
    assert torch.allclose(u.variances(), sampled.var(0), rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("native", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("diagonal", [False, True])
def test_statistics_products_agree_with_float64(diagonal, native, monkeypatch):
    """The moments' large products are taken in float32, the gated MLP's covariance products in
    bfloat16 where the CPU has it (products.py). At a wide layer's size float32 agrees with float64
    to ~1e-6 relative (rounding over K terms), asserted at 1e-4 on the covariance's scale. bfloat16
    keeps 8 significant bits: inputs and the product's output each err by <= 2^-9 relative, so each
    term of diag(W^T (C W)) by <= ~3 * 2^-9 = 0.6%, and the variances (sums of such terms, here
    mostly of one sign) by no more; asserted at 1%. Both far below what the moments estimate."""
    if native and not products.native_bfloat16("cpu"):
        pytest.skip("this CPU has no native bfloat16 products")
    monkeypatch.setattr(products, "_cpu_bfloat16", lambda: native)
    g = torch.Generator().manual_seed(3)
    k, n = 1536, 1100  # several CHUNKs of rows and columns
    mean = torch.randn(k, generator=g, dtype=torch.float64)
    if diagonal:
        x = stats.Moments(mean, torch.rand(k, generator=g, dtype=torch.float64) * 4 + 0.01)
    else:
        a = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
        x = stats.Moments(mean, a.t() @ a + 0.1 * torch.eye(k, dtype=torch.float64))
    w_g = torch.randn(k, n, generator=g) / math.sqrt(k)
    w_u = torch.randn(k, n, generator=g) / math.sqrt(k)
    c, wg, wu = x.dense_cov(), w_g.double(), w_u.double()
    lin = stats.linear(x, w_g)
    assert lin.mean.dtype == lin.cov.dtype == torch.float64
    assert torch.allclose(lin.mean, mean @ wg, rtol=0, atol=1e-9 * float(mean.abs().max()))
    exact = wg.t() @ c @ wg
    assert (lin.cov - exact).abs().max() <= 1e-4 * float(exact.diagonal().mean())
    u = stats.gated_mlp_hidden(x, w_g, w_u, "silu")
    cg, cu = c @ wg, c @ wu
    var_g, var_p, cov_gp = (cg * wg).sum(0), (cu * wu).sum(0), (cg * wu).sum(0)
    reference = _gated_reference(mean @ wg, mean @ wu, var_g, var_p, cov_gp)
    if native and not diagonal:  # a mean near zero moves with its unit's variance: 1% of the units' scale
        var = float(reference[1].mean())
        tols = dict(rtol=1e-2, atol=1e-2 * math.sqrt(var)), dict(rtol=1e-2, atol=1e-2 * var)
    else:
        tols = dict(rtol=1e-4, atol=1e-6), dict(rtol=1e-4, atol=1e-6)
    assert torch.allclose(u.mean, reference[0], **tols[0])
    assert torch.allclose(u.variances(), reference[1], **tols[1])
    if native and not diagonal:  # the products really are bfloat16 ones: C and W rounded to 8 bits, then C W too
        cgb, cub = ((c.float().bfloat16() @ w.bfloat16()).float().double() for w in (w_g, w_u))
        rounded = _gated_reference(mean @ wg, mean @ wu, (cgb * wg).sum(0), (cub * wu).sum(0), (cgb * wu).sum(0))
        assert torch.allclose(u.variances(), rounded[1], rtol=1e-6, atol=1e-9)
        assert not torch.allclose(u.variances(), reference[1], rtol=1e-6, atol=1e-9)


def _gated_reference(mu_g, mu_p, var_g, var_p, cov_gp):
    """SiLU(g) * p moments by the same quadrature from float64 second moments."""
    nodes, weights = (torch.as_tensor(t, dtype=torch.float64) for t in np.polynomial.hermite.hermgauss(48))
    weights = weights / math.sqrt(math.pi)
    a = cov_gp / var_g
    var_e = (var_p - a * cov_gp).clamp(min=0.0)
    gg = mu_g[:, None] + math.sqrt(2.0) * var_g.sqrt()[:, None] * nodes[None, :]
    f = gg * torch.sigmoid(gg)
    p = mu_p[:, None] + a[:, None] * (gg - mu_g[:, None])
    m1 = (weights * f * p).sum(1)
    m2 = (weights * f * f * p * p).sum(1) + var_e * (weights * f * f).sum(1)
    return m1, (m2 - m1 * m1).clamp(min=0.0)


@pytest.mark.parametrize("k", [256, 4160])
def test_online_rotation_is_exact_and_its_hessian_measures_the_same_error(k):
    """x' = x blockdiag(T), W' = T^T W: same product; the rotated H (blocks + the mean direction,
    never a K x K matrix) gives the same weighted error, at any K and any per-row scaling."""
    t = transforms.hadamard(64)
    w = planted(k, 48)
    x = torch.randn(7, k)
    row = torch.rand(k) + 0.5
    tf = SiteTransform(row=row, online=t)
    x_rot = transforms.block_rotate((x * row).t(), t.t()).t()  # x diag(a) blockdiag(T)
    assert torch.allclose(x_rot @ tf.forward(w), x @ w, atol=1e-4)
    g = torch.Generator().manual_seed(5)
    h = rounding.LowRank(torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g))
    d_rot = torch.randn(k, 48, generator=g)
    want = rounding.weighted_error(tf.backward(d_rot), None, h)
    assert isinstance(tf.hessian(h), rounding.BlockLowRank)
    assert rounding.weighted_error(d_rot, None, tf.hessian(h)) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("fmt", [FMT4, FMT3, QuantFormat(2, 32, False)])
def test_online_rotation_lowers_the_error_of_outlier_input_channels(fmt):
    """Weights with a few large input channels (rows): the rotation spreads them over their block."""
    w = planted(512, 96, outlier_rows=8)
    h = rounding.LowRank(torch.rand(512, generator=torch.Generator().manual_seed(4)) + 0.5, torch.zeros(512))
    how = Rounding(fmt, MethodConfig())
    plain = site.round_site(w, h, torch.float32, how, SiteTransform(), [])
    rotated = site.round_site(w, h, torch.float32, how, SiteTransform(online=transforms.hadamard(64)), [])
    assert rotated.error < 0.8 * plain.error, (rotated.error, plain.error)


def test_online_block_size_divides_k():
    assert transforms.online_block_size(2048, 64) == 64
    assert transforms.online_block_size(640, 128) == 128
    assert transforms.online_block_size(96, 64) == 32
    assert transforms.online_block_size(100, 64) is None


def _dense_second(pair, a, b):
    """E[z_a^T z_b] written out densely, head by head (the definition the structured form follows)."""
    a64, b64 = a.double(), b.double()
    cov = a64.t() @ pair.x.dense_cov() @ b64
    blocks, ma, mb = [], [], []
    for h in range(pair.heads):
        g = slice((h // pair.group) * pair.d, (h // pair.group + 1) * pair.d)
        blocks.append(stats.ATTENTION_CONCENTRATION * cov[g, g])
        ma.append((pair.x.mean @ a64)[g])
        mb.append((pair.x.mean @ b64)[g])
    return torch.block_diag(*blocks) + torch.outer(torch.cat(ma), torch.cat(mb))


def test_pair_moments_match_their_dense_definition():
    pair, heads, kv, d = _pair_setup(seed=3)
    g = torch.Generator().manual_seed(1)
    v_hat = pair.w_v + 0.01 * torch.randn(pair.w_v.shape, generator=g)
    o_hat = pair.w_o + 0.01 * torch.randn(pair.w_o.shape, generator=g)
    h_true, h_hat, cross = (_dense_second(pair, *ab) for ab in ((pair.w_v, pair.w_v), (v_hat, v_hat), (v_hat, pair.w_v)))
    wo, oh = pair.w_o.double(), o_hat.double()
    ref = float((wo * (h_true @ wo)).sum() - 2 * (oh * (cross @ wo)).sum() + (oh * (h_hat @ oh)).sum())
    assert pair.error(v_hat, o_hat) == pytest.approx(ref, rel=1e-9)
    assert pair.energy == pytest.approx(float((wo * (h_true @ wo)).sum()), rel=1e-12)
    structured, _ = pair.moments_of(v_hat)
    assert torch.allclose(structured.dense(), h_hat, rtol=1e-12, atol=1e-12)
    ridge = 1e-3 * float(h_hat.diagonal().mean())
    rhs = cross @ wo
    dense = torch.linalg.solve(h_hat + ridge * torch.eye(h_hat.shape[0], dtype=torch.float64), rhs)
    assert torch.allclose(structured.solve(rhs, ridge), dense, rtol=1e-8, atol=1e-10 * float(dense.abs().max()))


def test_block_diagonal_products_equal_the_dense_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g)
    for blocks in (torch.randn(1, 8, 8, generator=g), torch.randn(5, 8, 8, generator=g), torch.randn(6, 8, 8, generator=g)):
        m = transforms.BlockDiagonal(blocks)
        if blocks.shape[0] != 5:  # 6 blocks (or one shared) of 8 cover K = 48
            assert torch.allclose(m.times(w), m.dense(48) @ w, atol=1e-5)
            over = w.clone()
            assert m.times_(over, columns=7) is over and torch.allclose(over, m.times(w), rtol=1e-6, atol=1e-6)
            assert torch.allclose(m.inverse().times(m.times(w)), w, atol=1e-3)
        if blocks.shape[0] != 6:  # 5 blocks (or one shared) of 8 cover N = 40
            assert torch.allclose(m.right_of(w), w @ m.dense(40), atol=1e-5)
            assert torch.allclose(m.t().dense(40), m.dense(40).t())


def test_scoring_a_rounding_in_place_gives_the_same_numbers():
    """round_site scales each rounding's W_hat back and differences it in place to hold two fewer
    layer-sized buffers: the back-transform and the proxy error must be bit-identical to the
    out-of-place ones, and only the temporary handed over is overwritten."""
    gen = torch.Generator().manual_seed(11)
    k, n = 96, 40
    w = torch.randn(k, n, generator=gen)
    h = rounding.LowRank(torch.rand(k, generator=gen) + 0.1, torch.randn(k, generator=gen))
    block = transforms.hadamard(32)
    tf = SiteTransform(row=torch.rand(k, generator=gen) + 0.5, col=torch.rand(n, generator=gen) + 0.5, online=block)
    w_hat = grid.rtn(tf.forward(w), QuantFormat(4, 32, True)).dequantize()
    for transform in (tf, SiteTransform(row=tf.row), SiteTransform()):
        expected = transform.backward(w_hat)
        kept = w_hat.clone()
        got = transform.backward(w_hat.clone(), owned=True)
        assert torch.equal(got, expected) and torch.equal(w_hat, kept)
        reference = rounding.weighted_error(w, expected, h)
        w_before = w.clone()
        assert rounding.weighted_error(w, got, h, consume=True) == reference
        assert torch.equal(w, w_before)  # W itself is never touched
