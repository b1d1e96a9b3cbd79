"""Transforms learned from the weights alone: Adam on the rounding proxy through a straight-through
round (the forward pass rounds for real, the backward pass takes round as the identity), measured in
the original space under the propagated statistics.

Each learner starts from what the searches chose, checks the true proxy (real round-to-nearest, no
straight-through) as it goes and returns the best iterate it saw, the start included: it never
returns worse than where it began. Callers then keep a learned transform only where the sites'
final rounding (GPTQ, scale search) is better with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..config import QuantFormat
from . import grid, pair_loss, rounding

CHECK_EVERY = 25  # steps between checks of the true proxy (a real rounding of every weight)
STE_COLUMNS = 512  # columns of a wide weight the straight-through loss sees (the checks see all)
STE_O_COLUMNS = 128  # columns of O the V/O loss sees: its cost is the pair products over them
STE_V_ROWS = 1024  # rows of V (whole quantization blocks) whose rounding the V/O loss sees: its cost grows as their square
CONDITION_LIMIT = 100.0  # a general invertible block above this condition number is refused


def ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def ste_fake_quant(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Round-to-nearest of W[K, N] on row blocks with min/max scales, as grid.rtn computes it, but
    differentiable: round passes gradients straight through and the scales follow max/min."""
    k, n = w.shape
    blocks = grid.to_row_blocks(w, fmt.block_size)  # [kb, bs, N]
    mx = blocks.amax(1, keepdim=True)
    mn = blocks.amin(1, keepdim=True)
    qmax = float(grid.grid_max(fmt.bits))
    if fmt.symmetric:
        half = float(1 << (fmt.bits - 1))
        s = -torch.where(mx.abs() > mn.abs(), mx, mn) / half  # the largest magnitude maps to -half
        s = torch.where(s == 0, torch.ones_like(s), s)
        deq = torch.clamp(ste_round(blocks / s), -half, qmax - half) * s
    else:
        span = torch.clamp(mx, min=0.0) - torch.clamp(mn, max=0.0)
        s = torch.where(span == 0, torch.ones_like(span), span / qmax)
        z = torch.clamp(ste_round(-torch.clamp(mn, max=0.0) / s), 0.0, qmax)
        deq = (torch.clamp(ste_round(blocks / s) + z, 0.0, qmax) - z) * s
    return deq.reshape(-1, n)[:k]


def proxy(delta: torch.Tensor, h) -> torch.Tensor:
    """tr(D^T H D) as a differentiable scalar; H dense [K, K] or a rounding.LowRank."""
    if isinstance(h, rounding.LowRank):
        return (h.diag.unsqueeze(1) * delta * delta).sum() + ((h.vec @ delta) ** 2).sum()
    return (delta * (h @ delta)).sum()


@dataclasses.dataclass
class Learned:
    value: object  # the learned transform (its form is the learner's)
    error: float  # true proxy (round-to-nearest) at `value`
    start_error: float  # true proxy at the start

    @property
    def moved(self) -> bool:
        return self.error < self.start_error


def descend(params: list[torch.Tensor], loss: Callable[[], torch.Tensor], true_error: Callable[[], float], steps: int, lr: float):
    """Adam on `loss` for `steps` steps; the parameters with the lowest `true_error` seen (start included)."""
    with torch.no_grad():
        start = true_error()
    best = (start, [p.detach().clone() for p in params])
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if step % CHECK_EVERY == 0 or step == steps:
            with torch.no_grad():
                e = true_error()
            if e < best[0]:
                best = (e, [p.detach().clone() for p in params])
    return best[1], best[0], start


def _columns(w: torch.Tensor) -> torch.Tensor:
    """Evenly spaced columns of a wide W for the straight-through loss (it is a sum over columns)."""
    n = w.shape[1]
    if n <= STE_COLUMNS:
        return w
    return w[:, torch.linspace(0, n - 1, STE_COLUMNS, device=w.device).long()]


# ----------------------------------------------------------------------------- diagonals


def learn_diagonal(weights: list[torch.Tensor], h, fmt: QuantFormat, start: torch.Tensor | None, steps: int, lr: float, scale_dtype) -> Learned:
    """A per-channel input scaling a (W' = W / a, x' = x a) shared by `weights`, as log-scales from
    `start` (ones if None), minimising sum over W of tr(D^T H D), D = a (W' - Q(W')), H the
    statistics of the shared input. The geometric mean of a stays 1 (a global factor changes nothing)."""
    w32 = [w.to(torch.float32) for w in weights]
    sub = [_columns(w) for w in w32]
    a0 = torch.ones(w32[0].shape[0], device=w32[0].device) if start is None else start.to(torch.float32)
    log_a = torch.log(a0).clone().requires_grad_(True)
    norm = sum(rounding.weighted_error(w, None, h) for w in sub) or 1.0

    def scaling(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x - x.mean())

    def loss() -> torch.Tensor:
        a = scaling(log_a).unsqueeze(1)
        return sum(proxy(a * (w / a - ste_fake_quant(w / a, fmt)), h) for w in sub) / norm

    def true_error() -> float:
        a = scaling(log_a).unsqueeze(1)
        return sum(rounding.weighted_error(w, a * grid.fake_quant(w / a, fmt, scale_dtype), h) for w in w32)

    (best,), err, start_err = descend([log_a], loss, true_error, steps, lr)
    return Learned(scaling(best), err, start_err)


# ----------------------------------------------------------------------------- V/O blocks


def well_conditioned(blocks: torch.Tensor) -> bool:
    return bool((torch.linalg.cond(blocks.to(torch.float64)) <= CONDITION_LIMIT).all())


def learn_value_output(
    pair, row_scale, start: torch.Tensor, fmt_v: QuantFormat, fmt_o: QuantFormat, steps: int, lr: float, dtypes, objective: str = "pair"
) -> Learned:
    """A general invertible T_g per KV head (V' = V T, O' = T^-1 O for its query heads), from
    `start` [kv, d, d], minimising the pair error E||z W_o - z^ O^||^2 of both rounded by
    round-to-nearest; `row_scale` is the norm scaling already on V's rows (or None). The
    straight-through loss sees STE_O_COLUMNS of O's columns in float32 (the error is a sum over
    them); the checks see the whole pair in float64. A T whose condition number passes
    CONDITION_LIMIT scores infinity: it is never returned. `objective = "ranges"` descends the
    smooth surrogate of `ranges_loss` instead (no rounding in the loss); the checks are the same."""
    v_dtype, o_dtype = dtypes
    n = pair.w_o.shape[1]
    sub = pair if n <= STE_O_COLUMNS else pair.columns(torch.linspace(0, n - 1, STE_O_COLUMNS, device=pair.w_o.device).long(), torch.float32)
    a = None if row_scale is None else row_scale.to(torch.float32).unsqueeze(1)
    v_rows = pair.w_v.to(torch.float32)
    v_rows = v_rows if a is None else v_rows / a
    kv, d, group = pair.kv, pair.d, pair.group
    sample = pair_loss.RowSample.of(sub, _row_blocks(v_rows.shape[0], fmt_v.block_size, STE_V_ROWS, v_rows.device))
    t = start.to(torch.float32).clone().requires_grad_(True)
    norm = sub.energy or 1.0

    def rounded(tt: torch.Tensor, w_o: torch.Tensor, quant, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        v = v_rows if rows is None else v_rows[rows]  # whole quantization blocks: rounded as in the whole V
        k = v.shape[0]
        by_group = lambda x: x.reshape(k, kv, d).transpose(0, 1)  # noqa: E731  [K, kv d] -> [kv, K, d]
        back = lambda x: x.transpose(0, 1).reshape(k, kv * d)  # noqa: E731
        t_inv = torch.linalg.inv(tt)  # well conditioned (CONDITION_LIMIT): one d x d inverse per KV head
        v_hat = back(by_group(quant(back(by_group(v) @ tt), fmt_v, v_dtype)) @ t_inv)  # Q(V T) T^-1
        v_hat = v_hat if a is None else v_hat * (a if rows is None else a[rows])
        o_t = _per_group(torch.matmul, t_inv, w_o.to(torch.float32), group)  # T^-1 O
        o_hat = _per_group(torch.matmul, tt, quant(o_t, fmt_o, o_dtype), group)
        return v_hat, o_hat

    def loss() -> torch.Tensor:
        v_hat, o_hat = rounded(t, sub.w_o, lambda w, fmt, _dtype: ste_fake_quant(w, fmt), sample.rows)
        return sub.error_tensor(v_hat, o_hat, sample) / norm

    if objective == "ranges":
        loss = ranges_loss(pair, v_rows, a, t, fmt_v, fmt_o)

    def true_error() -> float:
        if not well_conditioned(t):
            return float("inf")
        return pair.error(*rounded(t.detach(), pair.w_o, grid.fake_quant))

    (best,), err, start_err = descend([t], loss, true_error, steps, lr)
    return Learned(best, err, start_err)


RANGE_TEMPERATURE = 0.1  # log-sum-exp temperature, in units of the weight's RMS: its max overshoots by <= 0.1 ln(2 * block) RMS


def ranges_loss(pair, v_rows: torch.Tensor, a, t: torch.Tensor, fmt_v: QuantFormat, fmt_o: QuantFormat):
    """`range_noise_error` as the V/O learner's loss: a closure over `t`, 1 at the start."""
    error = range_noise_error(pair, v_rows, a, fmt_v, fmt_o)
    with torch.no_grad():
        scale = float(sum(error(t))) or 1.0
    return lambda: sum(error(t)) / scale


def range_noise_error(pair, v_rows: torch.Tensor, a, fmt_v: QuantFormat, fmt_o: QuantFormat):
    """The paper's alternative V/O objective: per-block ranges of V' = V T and O' = T^-1 O, smoothed
    by log-sum-exp, turned into the pair error they cause if rounding is uniform noise of variance
    step^2 / 12 (step = range / levels). V's noise N reaches the output as a N T^-1 W_o, so a channel
    j of V' costs its steps' energy under the value statistics times ||row j of O'||^2; O's noise N'
    as z T N', so a row i of O' costs its steps' energy times (T^T E[z^T z] T)_ii. Returns
    T [kv, d, d] -> (V's share, O's share), differentiable in T; `v_rows` is V with `a` divided out."""
    kv, d, group = pair.kv, pair.d, pair.group
    k = v_rows.shape[0]
    h_v = torch.diagonal(pair.value_hessian()).to(torch.float32)  # c diag(C) + m^2
    row_w = h_v if a is None else h_v * a.squeeze(1) ** 2  # V's error in its original rows is a (N T^-1)
    block_w = grid.to_row_blocks(row_w.unsqueeze(1), fmt_v.block_size).sum(1)  # [kb, 1]
    mu = pair.h_true.mean_a.reshape(kv, group, d)[:, 0].to(torch.float32)  # every query head of a group shares it
    h_z = pair.h_true.blocks.to(torch.float32) + mu.unsqueeze(2) * mu.unsqueeze(1)  # E[z^T z] per KV head [kv, d, d]
    w_o = pair.w_o.to(torch.float32)
    m = w_o.shape[1]
    temp_v = RANGE_TEMPERATURE * float(v_rows.pow(2).mean().sqrt()) or 1.0
    temp_o = RANGE_TEMPERATURE * float(w_o.pow(2).mean().sqrt()) or 1.0

    def step_sq(w: torch.Tensor, fmt: QuantFormat, temp: float) -> torch.Tensor:
        """(smooth range / levels)^2 per row block and column [kb, N]."""
        blocks = grid.to_row_blocks(w, fmt.block_size)
        top = temp * torch.logsumexp(blocks / temp, 1)
        bottom = -temp * torch.logsumexp(-blocks / temp, 1)
        if fmt.symmetric:  # the larger magnitude is 2^(bits-1) steps
            step = temp * torch.logsumexp(torch.stack([top, -bottom]) / temp, 0) / (1 << (fmt.bits - 1))
        else:  # max(top, 0) - min(bottom, 0) over 2^bits - 1 steps: the grid always holds zero
            soft = torch.nn.functional.softplus
            step = temp * (soft(top / temp) + soft(-bottom / temp)) / grid.grid_max(fmt.bits)
        return step * step

    def surrogate(tt: torch.Tensor) -> torch.Tensor:
        t_inv = torch.linalg.inv(tt)
        v_t = (v_rows.reshape(k, kv, d).transpose(0, 1) @ tt).transpose(0, 1).reshape(k, kv * d)  # V T per group
        o_t = _per_group(torch.matmul, t_inv, w_o, group)  # T^-1 O
        u = (step_sq(v_t, fmt_v, temp_v) * block_w).sum(0)  # [kv d]: V' channel j's noise energy under the statistics
        o_rows = o_t.reshape(kv, group, d, m).pow(2).sum((1, 3)).reshape(-1)  # ||row j of O'||^2 over its query heads
        z_t = (tt.transpose(1, 2) @ h_z @ tt).diagonal(dim1=1, dim2=2)  # (T^T E[z^T z] T)_ii [kv, d]
        per_row = z_t.unsqueeze(1).expand(kv, group, d).reshape(-1, 1)  # O' rows, per query head
        o_noise = grid.to_row_blocks(per_row.expand(-1, m), fmt_o.block_size) * step_sq(o_t, fmt_o, temp_o).unsqueeze(1)
        return (u * o_rows).sum() / 12.0, o_noise.sum() / 12.0

    return surrogate


def _row_blocks(k: int, block: int, most: int, device) -> torch.Tensor:
    """Rows of whole quantization blocks, evenly spaced, at most `most` of them (all rows when K fits)."""
    blocks = k // block
    if k <= most or blocks == 0:
        return torch.arange(k, device=device)
    chosen = torch.linspace(0, blocks - 1, max(1, most // block), device=device).round().long().unique()
    return (chosen.unsqueeze(1) * block + torch.arange(block, device=device)).reshape(-1)


def _per_group(op, t: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """op(T_g, O rows of the query heads of KV head g) for O[heads * d, M], with the heads of one
    group side by side as columns: one factorisation per KV head, not one per query head."""
    kv, d, _ = t.shape
    m = w.shape[1]
    cols = w.reshape(kv, group, d, m).transpose(1, 2).reshape(kv, d, group * m)
    return op(t, cols).reshape(kv, d, group, m).transpose(1, 2).reshape(-1, m)


# ----------------------------------------------------------------------------- online blocks


def learn_online(weights: list[torch.Tensor], h, fmt: QuantFormat, start: torch.Tensor, steps: int, lr: float, dtype) -> Learned:
    """A block-diagonal general invertible A on the linears' shared input (x' = x A, W' = A^-1 W),
    one b x b block per b input channels, from `start` [K/b, b, b], minimising the sum over W of
    tr(D^T H D), D = W - A Q(A^-1 W). Each iterate is rounded to the activation `dtype` first: the
    graph multiplies by exactly that A, so the weights are computed with its own inverse."""
    w32 = [w.to(torch.float32) for w in weights]
    sub = [_columns(w) for w in w32]
    n, b, _ = start.shape
    t = start.to(torch.float32).clone().requires_grad_(True)
    norm = sum(rounding.weighted_error(w, None, h) for w in sub) or 1.0

    def rounded(tt: torch.Tensor, w: torch.Tensor, quant) -> torch.Tensor:
        k, m = w.shape
        inner = (torch.linalg.inv(tt) @ w.reshape(n, b, m)).reshape(k, m)  # A^-1 W, block by block (b x b inverses)
        return (tt @ quant(inner).reshape(n, b, m)).reshape(k, m)  # A Q(A^-1 W)

    def loss() -> torch.Tensor:
        return sum(proxy(w - rounded(t, w, lambda x: ste_fake_quant(x, fmt)), h) for w in sub) / norm

    def true_error() -> float:
        stored = as_stored(t.detach(), dtype)
        if not well_conditioned(stored):
            return float("inf")
        return sum(rounding.weighted_error(w, rounded(stored, w, lambda x: grid.fake_quant(x, fmt, dtype)), h) for w in w32)

    (best,), err, start_err = descend([t], loss, true_error, steps, lr)
    return Learned(as_stored(best, dtype), err, start_err)


def as_stored(t: torch.Tensor, dtype) -> torch.Tensor:
    """The float32 values of `t` once written in `dtype` (the activation's)."""
    return t.to(dtype).to(torch.float32)


# ----------------------------------------------------------------------------- Q/K RoPE factors


def learn_rope_angles(wq, wk, h, fmt: QuantFormat, start: torch.Tensor, head_dim: int, rotary_dim: int, steps: int, lr: float, scale_dtype) -> Learned:
    """The angle phi per KV group and RoPE pair (i, i + r/2) of a unit factor e^{i phi} on q's pair (every
    query head of the group) and on k's, so every score stays; from the searched angles `start` [kv, r/2].
    A rotation keeps a pair's error, so the loss is the transformed weights' error. (A magnitude m on q
    and 1/m on k would be the general factor, but a column scaled whole rounds to the same codes with its
    block scales scaled: inert for blocks along K, so not learned.)"""
    d, half = head_dim, rotary_dim // 2
    kv = wk.shape[1] // d
    group = wq.shape[1] // d // kv
    wq32, wk32 = wq.to(torch.float32), wk.to(torch.float32)
    phi = start.to(torch.float32).clone().requires_grad_(True)
    norm = (rounding.weighted_error(wq32, None, h) + rounding.weighted_error(wk32, None, h)) or 1.0

    def rotated(w, angle):
        w3 = w.reshape(w.shape[0], -1, d)
        x, y, rest = w3[..., :half], w3[..., half : 2 * half], w3[..., 2 * half :]
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.cat([c * x - s * y, s * x + c * y, rest], dim=-1).reshape(w.shape)

    def error(quant) -> torch.Tensor:
        total = torch.zeros((), device=wq32.device)
        for w, angle in ((wq32, phi.repeat_interleave(group, 0)), (wk32, phi)):
            wt = rotated(w, angle)
            total = total + proxy(wt - quant(wt), h)
        return total

    loss = lambda: error(lambda w: ste_fake_quant(w, fmt)) / norm  # noqa: E731
    true_error = lambda: float(error(lambda w: grid.fake_quant(w, fmt, scale_dtype)))  # noqa: E731
    (angles,), err, start_err = descend([phi], loss, true_error, steps, lr)
    return Learned(angles, err, start_err)
