"""Learned transforms (quant/learn.py) on small matrices with planted outlier channels: the true
rounded proxy after learning is below the start's, the learned general V/O block beats the best
orthogonal candidate, the conditioning guard holds, and the recipe knobs are checked."""

from __future__ import annotations

import math

import pytest
import torch

from dfq_onnx.config import QuantFormat, recipe_from_dict
from dfq_onnx.errors import DfqError
from dfq_onnx.quant import grid, learn, rounding, stats, transforms
from dfq_onnx.quant.site import SiteTransform
from dfq_onnx.quant.value_output import Pair

FORMATS = [QuantFormat(4, 32, True), QuantFormat(3, 32, False), QuantFormat(2, 32, False)]


def planted(k: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.02
    w[torch.randperm(k, generator=g)[:3]] *= 12.0  # outlier input channels
    w[:, torch.randperm(n, generator=g)[:2]] *= 6.0
    return w


def prior(k: int, seed: int = 1) -> rounding.LowRank:
    g = torch.Generator().manual_seed(seed)
    return rounding.LowRank(torch.exp(torch.randn(k, generator=g)), 0.3 * torch.randn(k, generator=g))


def test_straight_through_round_trip_matches_real_rounding():
    """The forward pass of the straight-through quantizer is round-to-nearest (up to ties), and the
    gradient reaches the weights."""
    w = planted(96, 40).requires_grad_(True)
    for fmt in FORMATS:
        got = learn.ste_fake_quant(w, fmt)
        ref = grid.fake_quant(w.detach(), fmt)
        # Ties round half to even here, half away from zero in grid: at most one step on a tie.
        step = (ref - got.detach()).abs().max()
        assert float((ref - got.detach()).abs().mean()) < 1e-3 * float(ref.abs().mean()), fmt
        assert step <= float(w.detach().abs().max()), fmt
        got.sum().backward()
        assert w.grad is not None and bool(torch.isfinite(w.grad).all())
        w.grad = None


@pytest.mark.parametrize("fmt", FORMATS)
def test_learned_diagonal_lowers_the_true_rounded_proxy(fmt):
    ws = [planted(128, 64, seed=i) for i in range(2)]
    h = prior(128)
    start = transforms.search_diagonal(ws, rounding.hessian_diagonal(h), fmt)
    found = learn.learn_diagonal(ws, h, fmt, start.a, steps=60, lr=0.01, scale_dtype=torch.float32)
    # Its error is the true proxy of real round-to-nearest (recomputed here), below the searched start's.
    a = found.value.unsqueeze(1)
    true = sum(rounding.weighted_error(w, a * grid.fake_quant(w / a, fmt), h) for w in ws)
    assert math.isclose(true, found.error, rel_tol=1e-9)
    start_true = sum(rounding.weighted_error(w, start.a.unsqueeze(1) * grid.fake_quant(w / start.a.unsqueeze(1), fmt), h) for w in ws)
    # The learner renormalises the start to geometric mean 1 in float32 (a moves by ~1e-7 relative).
    assert math.isclose(start_true, found.start_error, rel_tol=1e-5)
    assert found.error < 0.99 * found.start_error, (found.error, found.start_error)
    assert math.isclose(float(torch.log(found.value).mean()), 0.0, abs_tol=1e-5)  # geometric mean 1


def test_learning_never_returns_worse_than_its_start():
    """With a learning rate far too large the iterates get worse; the start is returned unchanged."""
    ws = [planted(64, 32)]
    h = prior(64)
    start = torch.ones(64)
    found = learn.learn_diagonal(ws, h, FORMATS[0], start, steps=20, lr=50.0, scale_dtype=torch.float32)
    assert found.error <= found.start_error
    if not found.moved:
        assert torch.equal(found.value, start)


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, d, kv, heads = 96, 32, 2, 4
    w_v = torch.randn(k, kv * d, generator=g)
    w_v[:, 3] *= 15.0  # an outlier value channel
    w_o = torch.randn(heads * d, k, generator=g)
    w_o[10] *= 10.0
    a = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    x = stats.Moments(0.1 * torch.randn(k, generator=g, dtype=torch.float64), a @ a.t() + 0.1 * torch.eye(k, dtype=torch.float64))
    return Pair(x, w_v, w_o, heads, d), d, kv


@pytest.mark.parametrize("fmt", FORMATS)
def test_learned_general_vo_block_beats_the_best_orthogonal_one(fmt):
    pair, d, kv = _pair()
    dtypes = (torch.float32, torch.float32)
    starts = {"identity": torch.eye(d), "hadamard": transforms.hadamard(d)}
    found = {name: learn.learn_value_output(pair, None, t.expand(kv, d, d), fmt, fmt, 60, 1e-3, dtypes) for name, t in starts.items()}
    best_orthogonal = min(f.start_error for f in found.values())
    best_learned = min(f.error for f in found.values())
    assert best_learned < 0.9 * best_orthogonal, (best_learned, best_orthogonal)
    for f in found.values():
        assert f.error <= f.start_error
        assert float(torch.linalg.cond(f.value.double()).max()) <= learn.CONDITION_LIMIT
        # The learned block is general: not orthogonal any more.
        eye = torch.eye(d).expand(kv, d, d)
        assert float((f.value @ f.value.transpose(1, 2) - eye).abs().max()) > 1e-3


def _block_steps(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round-to-nearest's step per element of W (its row block's), min/max scales."""
    b = grid.to_row_blocks(w, fmt.block_size)
    mx, mn = b.amax(1), b.amin(1)
    if fmt.symmetric:
        s = torch.maximum(mx.abs(), mn.abs()) / (1 << (fmt.bits - 1))
    else:
        s = (mx.clamp(min=0) - mn.clamp(max=0)) / grid.grid_max(fmt.bits)
    return s.repeat_interleave(fmt.block_size, 0)[: w.shape[0]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_range_objective_is_the_pair_error_of_uniform_rounding_noise(fmt, monkeypatch):
    """With a sharp log-sum-exp the surrogate's two shares are the pair errors of uniform noise of each
    block's step on V alone and on O alone (Monte Carlo over 300 draws: its spread is ~1%)."""
    monkeypatch.setattr(learn, "RANGE_TEMPERATURE", 1e-4)
    pair, d, kv = _pair()
    t = torch.linalg.qr(torch.randn(kv, d, d, generator=torch.Generator().manual_seed(3)))[0]  # a non-trivial T
    tf_v = SiteTransform(col=transforms.BlockDiagonal(t))
    tf_o = SiteTransform(row=transforms.BlockDiagonal(t.repeat_interleave(pair.group, 0)).inverse())
    v_t, o_t = tf_v.forward(pair.w_v), tf_o.forward(pair.w_o)
    share_v, share_o = (float(x) for x in learn.range_noise_error(pair, pair.w_v.float(), None, fmt, fmt)(t))
    g = torch.Generator().manual_seed(0)
    noise = lambda w: (torch.rand(w.shape, generator=g) - 0.5) * _block_steps(w, fmt)  # noqa: E731
    draws = 300
    mc_v = sum(pair.error(tf_v.backward(v_t + noise(v_t)), pair.w_o) for _ in range(draws)) / draws
    mc_o = sum(pair.error(pair.w_v, tf_o.backward(o_t + noise(o_t))) for _ in range(draws)) / draws
    assert share_v == pytest.approx(mc_v, rel=0.03)
    assert share_o == pytest.approx(mc_o, rel=0.03)


@pytest.mark.parametrize("fmt", FORMATS)
def test_range_objective_lowers_the_true_rounded_pair_error(fmt):
    """Descending the smooth range surrogate (no rounding in the loss) lowers the real round-to-nearest
    pair error of the planted pair from either start, by more than a fifth."""
    pair, d, kv = _pair()
    for start in (torch.eye(d), transforms.hadamard(d)):
        found = learn.learn_value_output(pair, None, start.expand(kv, d, d), fmt, fmt, 100, 1e-3, (torch.float32, torch.float32), "ranges")
        assert found.error < 0.8 * found.start_error, (found.error, found.start_error)
        assert float(torch.linalg.cond(found.value.double()).max()) <= learn.CONDITION_LIMIT


def test_vo_learning_refuses_ill_conditioned_blocks():
    pair, d, kv = _pair(1)
    start = torch.eye(d).expand(kv, d, d).clone()
    start[0, 0, 0] = 1e-3  # condition number 1000: over the guard
    found = learn.learn_value_output(pair, None, start, FORMATS[0], FORMATS[0], 10, 1e-4, (torch.float32, torch.float32))
    assert found.start_error == float("inf")  # the start itself is refused
    if found.moved:  # an iterate that came back under the guard
        assert float(torch.linalg.cond(found.value.double()).max()) <= learn.CONDITION_LIMIT
    else:
        assert found.error == float("inf")  # nothing usable: the caller keeps its own transform


@pytest.mark.parametrize(
    "key, value",
    [("learned_diagonal_steps", -1), ("learned_vo_steps", 1.5), ("learned_vo_steps", True), ("learned_diagonal_lr", 0), ("learned_vo_lr", "fast"),
     ("learned_qk_steps", -1), ("learned_qk_lr", 0), ("learned_vo_objective", "range")],
)
def test_recipe_rejects_bad_learning_knobs(key, value):
    with pytest.raises(DfqError, match=key):
        recipe_from_dict({"method": {key: value}}, "test")


def test_general_online_blocks_are_exact_and_their_hessian_measures_the_same_error():
    """x' = x blockdiag(A_0, A_1, ...) with distinct general blocks, W' = A^-1 W: the same product, and
    the Hessian A^T H A gives the same weighted error (its blocks + mean-direction form)."""
    g = torch.Generator().manual_seed(2)
    k, b = 128, 32
    blocks = torch.eye(b) + 0.3 * torch.randn(k // b, b, b, generator=g)
    w = planted(k, 24)
    row = torch.rand(k, generator=g) + 0.5
    tf = SiteTransform(row=row, online=blocks)
    x = torch.randn(5, k, generator=g)
    x_t = transforms.BlockDiagonal(blocks).t().times((x * row).t()).t()  # x diag(a) blockdiag(A)
    assert torch.allclose(x_t @ tf.forward(w), x @ w, atol=1e-4)
    h = prior(k)
    d = torch.randn(k, 24, generator=g)
    want = rounding.weighted_error(tf.backward(d), None, h)
    assert rounding.weighted_error(d, None, tf.hessian(h)) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_learned_online_blocks_beat_the_hadamard(fmt):
    """From the Hadamard (the best orthogonal block the method has), learning general blocks lowers
    the true rounded proxy, stays under the conditioning guard, and is stored as the graph stores it."""
    ws = [planted(128, 64, seed=i) for i in range(2)]
    h = prior(128)
    b = 32
    start = transforms.hadamard(b).expand(128 // b, b, b)
    found = learn.learn_online(ws, h, fmt, start, steps=60, lr=1e-3, dtype=torch.float16)
    assert found.error < 0.95 * found.start_error, (found.error, found.start_error)
    assert float(torch.linalg.cond(found.value.double()).max()) <= learn.CONDITION_LIMIT
    assert torch.equal(found.value, found.value.to(torch.float16).to(torch.float32))  # what fp16 storage holds
    # The error it reports is the true proxy of round-to-nearest of A^-1 W under that very A.
    tf = SiteTransform(online=found.value)
    true = sum(rounding.weighted_error(w, tf.backward(grid.fake_quant(tf.forward(w), fmt, torch.float16)), h) for w in ws)
    assert true == pytest.approx(found.error, rel=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_learned_rope_angles_lower_the_true_rounded_proxy(fmt):
    """From no rotation, learning the angle of each q/k RoPE pair (shared by a KV group's query heads)
    lowers the true rounded proxy of q and k, and the error it reports is that of the rotations the
    method writes (transforms.rope_rotation on the weights, real round-to-nearest)."""
    d, kv, group = 32, 2, 2
    wq, wk = planted(128, kv * group * d, seed=3), planted(128, kv * d, seed=4)
    h = prior(128)
    found = learn.learn_rope_angles(wq, wk, h, fmt, torch.zeros(kv, d // 2), d, d, steps=100, lr=0.05, scale_dtype=torch.float32)
    assert found.error < 0.99 * found.start_error, (found.error, found.start_error)
    r_q = transforms.rope_rotation(found.value.repeat_interleave(group, 0), d)
    r_k = transforms.rope_rotation(found.value, d)
    true = sum(rounding.weighted_error(r.right_of(w), grid.fake_quant(r.right_of(w), fmt), h) for w, r in ((wq, r_q), (wk, r_k)))
    assert true == pytest.approx(found.error, rel=1e-4)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    q, k, q2, k2 = x @ wq, x @ wk, x @ r_q.right_of(wq), x @ r_k.right_of(wk)
    for head in range(kv * group):  # every query head against its KV group's head: the same scores
        g = head // group
        want = q[:, head * d : (head + 1) * d] @ k[:, g * d : (g + 1) * d].T
        got = q2[:, head * d : (head + 1) * d] @ k2[:, g * d : (g + 1) * d].T
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), head


def test_default_run_learns_nothing(tiny, tmp_path):
    """The README's default: every transform searched, none learned (the learners are recipe knobs).
    The tiny Gemma 2 from the exporter's defaults."""
    import json

    from dfq_onnx.front.cli import main

    out = tmp_path / "q.onnx"
    assert main(["optimize", str(tiny("dynamo")), "-o", str(out), "--bits", "3", "--quiet", "--verify", "none"]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    used = {t for site in report["sites"] for t in site["transforms"]}
    assert not any("learned" in t for t in used), used
    assert {"gptq", "scale-search", "vo-pair"} <= used, used


def test_fast_learns_nothing_and_writes_the_searched_transforms(tiny, tmp_path):
    """--fast turns off every learner a recipe turns on: no learned tag, and the bytes of the same
    recipe with its learners off (the searched transforms, GPTQ and the scale search all still run)."""
    import json

    from dfq_onnx.front.cli import main

    model = tiny("dynamo")
    fast, plain, learning = tmp_path / "fast.onnx", tmp_path / "plain.onnx", tmp_path / "learning.onnx"
    head = '[recipe]\nname = "r"\n[quant]\nbits = 3\nblock_size = 32\nsymmetric = false\n[method]\nname = "cafeq"\n'
    (tmp_path / "learns.toml").write_text(head + "learned_vo_steps = 30\nlearned_diagonal_steps = 30\n")
    (tmp_path / "no-learning.toml").write_text(head + "learned_vo_steps = 0\nlearned_diagonal_steps = 0\n")
    common = ["--quiet", "--verify", "none"]
    assert main(["optimize", str(model), "-o", str(fast), "--recipe", str(tmp_path / "learns.toml"), "--fast", *common]) == 0
    assert main(["optimize", str(model), "-o", str(plain), "--recipe", str(tmp_path / "no-learning.toml"), *common]) == 0
    assert main(["optimize", str(model), "-o", str(learning), "--recipe", str(tmp_path / "learns.toml"), *common]) == 0
    tags = lambda name: {t for site in json.loads((tmp_path / f"{name}.report.json").read_text())["sites"] for t in site["transforms"]}  # noqa: E731
    assert not any("learned" in t for t in tags("fast")), tags("fast")
    assert any("learned" in t for t in tags("learning")), tags("learning")  # the recipe does learn without --fast
    assert {"gptq", "scale-search", "vo-pair"} <= tags("fast")
    assert (tmp_path / "fast.onnx.data").read_bytes() == (tmp_path / "plain.onnx.data").read_bytes()


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "value-bias"])
def test_pair_loss_gradient_is_autograds(with_bias):
    """The V/O learner's loss has its gradient written out (quant/pair_loss.py): its value equals
    the pair error and its gradient the one autograd takes through the moments (GQA: 3 query heads
    per KV head, a value bias shifting z's mean), to float64 round-off."""
    from dfq_onnx.quant import stats
    from dfq_onnx.quant.value_output import Pair

    g = torch.Generator().manual_seed(4)
    k, kv, d, heads, m = 48, 2, 8, 6, 5
    a = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = stats.Moments(torch.randn(k, generator=g, dtype=torch.float64), a @ a.T / k)
    w_v = torch.randn(k, kv * d, generator=g, dtype=torch.float64)
    w_o = torch.randn(heads * d, m, generator=g, dtype=torch.float64)
    bias = torch.randn(kv * d, generator=g, dtype=torch.float64) if with_bias else None
    pair = Pair(x, w_v, w_o, heads, d, bias)

    def by_moments(v, o):
        h_hat, cross = pair.second(v, v), pair.second(v, pair.w_v)
        return pair.energy - 2 * (o * cross.times(pair._w_o)).sum() + (o * h_hat.times(o)).sum()

    v = (w_v + 0.1 * torch.randn(w_v.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    o = (w_o + 0.1 * torch.randn(w_o.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    want = by_moments(v, o)
    got = pair.error_tensor(v, o)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert float(got) == pytest.approx(pair.error(v.detach(), o.detach()), rel=1e-12)
    for w, h in zip(torch.autograd.grad(want, (v, o)), torch.autograd.grad(got, (v, o))):
        assert torch.allclose(w, h, rtol=1e-10, atol=1e-12 * float(w.abs().max()))
    assert torch.autograd.gradcheck(pair.error_tensor, (v, o))
    # On a sample of V's rows, the rows outside it unrounded: the same pair error, its gradient autograd's.
    from dfq_onnx.quant import pair_loss

    rows = torch.tensor([0, 1, 2, 3, 16, 17, 18, 19, 40, 41])
    sample = pair_loss.RowSample.of(pair, rows)
    v_rows = v.detach()[rows].clone().requires_grad_(True)
    full = pair.w_v.clone()
    full[rows] = v_rows.detach()
    assert float(pair.error_tensor(v_rows, o, sample)) == pytest.approx(pair.error(full, o.detach()), rel=1e-12)
    assert torch.autograd.gradcheck(lambda x, y: pair.error_tensor(x, y, sample), (v_rows, o))


def test_every_transform_knob_is_in_the_one_table():
    """Every learner (a `learned_*_steps` field) and every transform switch belongs to an entry of
    FREE_TRANSFORMS, so the off-switch and --fast cannot miss one: the table is what they read."""
    import dataclasses

    from dfq_onnx.config import FREE_TRANSFORMS, MethodConfig, without_learners, without_transforms

    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    steps = {name for name in fields if name.startswith("learned_") and name.endswith("_steps")}
    assert steps == {t.steps for t in FREE_TRANSFORMS}
    assert {t.lr for t in FREE_TRANSFORMS} <= fields and {t.switch for t in FREE_TRANSFORMS} <= fields
    every = dataclasses.replace(MethodConfig(), **{t.steps: 7 for t in FREE_TRANSFORMS})
    assert all(getattr(without_learners(every), t.steps) == 0 for t in FREE_TRANSFORMS)
    plain = without_transforms(every)
    assert all(getattr(plain, t.switch) == t.off for t in FREE_TRANSFORMS)
    assert not plain.diagonal and not plain.qk_transform and not plain.vo_transform and plain.online == ()
    assert plain.gptq and plain.scale_search  # the rounding itself stays
