"""V and O rounded as the pair they are: E||z W_o - z^ O^||^2, z the attention mix of x V (+ b).

V is rounded under the statistics of the mix of its input; O then compensates the rounded V
(least squares under E[z^T z^], rounded by GPTQ), and V and O alternate. Candidates for a free
invertible T per KV head (V' = V T, O' = T^-1 O) are scored by the pair error of plain rounding.
A partner the output keeps in float (--exclude) enters every pair error as its float weight: O
compensating a V rounding that is never written cost 2.5x round-to-nearest's KL (o alone at int2).
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import keeps
from . import grid, learn, pair_loss, rounding, stats, transforms
from .geometry import AttentionGeometry, LayerWeights
from .site import Rounding, SiteOutcome, SiteTransform, round_site, round_weight


def value_output(
    layer: LayerWeights, att: AttentionGeometry, w_v, bias, x, h, a, tags, how: Rounding, v_dtype, learn_vo: bool = True
) -> dict[str, SiteOutcome]:
    """V and o as one pair: E||z W_o - z^ W_o^||^2, z the attention mix of x V.

    Candidates for the free V/O transform T (per KV head) are tried; for each, V is rounded,
    then O compensates the rounded V, then (alternating) V the rounded O; the best pair is kept.
    """
    how_v, how_o = how.at(att.qkv or att.v), how.at(att.o)  # each its own format (recipe overrides)
    d, heads, config = att.head_dim, att.num_heads, how.config
    if not att.o:
        return {"v": round_site(w_v, h, v_dtype, how_v, SiteTransform(row=a), tags)}
    w_o = layer.weights[att.o]
    o_dtype = layer.scale_dtypes[att.o]
    if not (d and heads) or heads * d != w_o.shape[0]:
        eye = rounding.LowRank.identity(w_o.shape[0], w_o.device)
        return {
            "v": round_site(w_v, h, v_dtype, how_v, SiteTransform(row=a), tags),
            "o": round_site(w_o, eye, o_dtype, how_o, None, []),
        }
    pair = Pair(x, w_v, w_o, heads, d, bias)
    floats = (how.stays_float(att.qkv or att.v), how.stays_float(att.o))
    v_rtn = grid.rtn(w_v, how_v.fmt, v_dtype).dequantize()
    o_rtn = grid.rtn(w_o, how_o.fmt, o_dtype).dequantize()
    rtn_pair = pair.error(v_rtn, o_rtn)
    ref_pair = pair.energy

    # T per KV head is chosen by the pair error of plain rounding; the full pair rounding runs once.
    candidates = [("identity", None)]
    if config.vo_transform and (t := how.block(d, w_v.device)) is not None:
        candidates.append((config.rotation.value, t))
    chosen = None
    for label, t in candidates:
        # One d x d block per head: V' = V blockdiag(T), O' = blockdiag(T^-1) O.
        tf_v = SiteTransform(row=a, col=None if t is None else transforms.BlockDiagonal(t.unsqueeze(0)))
        tf_o = SiteTransform(row=None if t is None else transforms.BlockDiagonal(t.unsqueeze(0)).inverse())
        v_plain = w_v if floats[0] else tf_v.backward(grid.fake_quant(tf_v.forward(w_v), how_v.fmt, v_dtype))
        cheap = pair.error(v_plain, w_o if floats[1] else tf_o.backward(grid.fake_quant(tf_o.forward(w_o), how_o.fmt, o_dtype)))
        if chosen is None or cheap < chosen[0] or (config.force_transforms and t is not None):
            chosen = (cheap, tf_v, tf_o, [] if t is None else [f"vo-{label}"], v_plain)
    _, tf_v, tf_o, extra, v_plain = chosen
    qv, qo, err = round_pair(pair, tf_v, tf_o, how_v, how_o, v_dtype, o_dtype, floats, v_plain)
    learned = _learned_pair(pair, a, tf_v, how_v, how_o, v_dtype, o_dtype) if learn_vo else None
    if learned is not None:  # kept where the pair rounds better with it
        tf_v_l, tf_o_l = learned
        trial = round_pair(pair, tf_v_l, tf_o_l, how_v, how_o, v_dtype, o_dtype, floats)
        if keeps(config, trial[2], err):
            (qv, qo, err), tf_v, tf_o, extra = trial, tf_v_l, tf_o_l, ["vo-learned"]
    pair_tags = ["vo-pair", *how.tags()] if config.vo_pairs else how.tags()
    # V and O are scored as the product they compute (the proxy of a pair), both sites alike.
    return {
        "v": SiteOutcome(
            qv, err, rtn_pair, ref_pair, tags + extra + pair_tags,
            float_weight=tf_v.forward(w_v) if how.keep_float else None,
            columns=tf_v.columns if tf_v.col is not None else None,
        ),
        "o": SiteOutcome(qo, err, rtn_pair, ref_pair, extra + pair_tags, float_weight=tf_o.forward(w_o) if how.keep_float else None),
    }


def _learned_pair(pair: "Pair", a, tf_v: SiteTransform, how_v: Rounding, how_o: Rounding, v_dtype, o_dtype):
    """(V, O) transforms with a learned general T per KV head, started from the chosen block, or
    None where learning is off or did not lower the pair error of round-to-nearest."""
    config = how_v.config
    if not (config.vo_transform and config.learned_vo_steps > 0):
        return None
    d, kv = pair.d, pair.kv
    eye = torch.eye(d, device=pair.w_v.device)
    start = eye if tf_v.col is None else tf_v.col.blocks[0]
    found = learn.learn_value_output(
        pair, a, start.expand(kv, d, d), how_v.fmt, how_o.fmt, config.learned_vo_steps, config.learned_vo_lr, (v_dtype, o_dtype),
        config.learned_vo_objective,
    )
    if not (found.moved or config.force_transforms):
        return None
    blocks = transforms.BlockDiagonal(found.value)
    per_head = transforms.BlockDiagonal(found.value.repeat_interleave(pair.group, 0))
    return SiteTransform(row=a, col=blocks), SiteTransform(row=per_head.inverse())


def round_pair(pair: "Pair", tf_v, tf_o, how_v: Rounding, how_o: Rounding, v_dtype, o_dtype, floats=(False, False), v_plain_hat=None):
    """Round V (for the pair's input statistics), then O given V^, then alternate; keep the best pair.
    `floats`: (V, O) written in float, so the pair computes with that weight, not its rounding.
    `v_plain_hat`: what the model computes with round-to-nearest of V' (tf_v's), when the caller has it
    (the pair keeps its moments)."""
    config = how_v.config
    w_v_t = tf_v.forward(pair.w_v)
    h_v = rounding.DenseFactor(tf_v.hessian(pair.value_hessian()))  # factored once for every V rounding below
    qv = round_weight(w_v_t, h_v, v_dtype, how_v)
    v_of = lambda q: pair.w_v if floats[0] else tf_v.backward(q.dequantize())  # noqa: E731  what the model computes
    o_of = lambda q: pair.w_o if floats[1] else tf_o.backward(q.dequantize())  # noqa: E731
    best = None
    for step in range(max(1, config.alternations)):
        v_hat = v_of(qv)
        qo = _round_o(pair, v_hat, tf_o, how_o, o_dtype)
        err = pair.error(v_hat, o_of(qo))
        if best is None or err < best[2]:
            best = (qv, qo, err, v_hat)
        if not config.vo_pairs or any(floats) or step + 1 >= config.alternations:
            break  # with a float partner there is nothing to alternate against
        # V given O^: its least-squares target, rounded under the pair's input statistics.
        target = pair.value_target(o_of(qo))
        qv = round_weight(tf_v.forward(target), h_v, v_dtype, how_v)
    # Round-to-nearest of the (transformed) O given the chosen V^ is always a candidate (its moments kept).
    qv, qo, err, v_hat = best
    o_plain = grid.rtn(tf_o.forward(pair.w_o), how_o.fmt, o_dtype)
    plain_err = pair.error(v_hat, o_of(o_plain))
    if plain_err < err:
        qo, err = o_plain, plain_err
    # So is round-to-nearest of both: without a transform, the pair is then never worse than it.
    v_plain = grid.rtn(w_v_t, how_v.fmt, v_dtype)
    both_err = pair.error(v_of(v_plain) if v_plain_hat is None else v_plain_hat, o_of(o_plain))
    if both_err < err:
        qv, qo, err = v_plain, o_plain, both_err
    return qv, qo, err


def _round_o(pair: "Pair", v_hat, tf_o: SiteTransform, how: Rounding, dtype) -> grid.Quantized:
    h_hat, cross = pair.moments_of(v_hat)
    if not how.config.vo_pairs:
        return round_weight(tf_o.forward(pair.w_o), tf_o.hessian(h_hat.hessian()), dtype, how)
    # With V^ fixed the best O solves E[z^T z^] X = E[z^T z] W_o; round it under E[z^T z^].
    # The ridge keeps the solve defined for degenerate weights (an all-zero or rank-deficient V^).
    ridge = max(1e-6 * float(h_hat.diagonal().mean()), 1e-30)
    target = h_hat.solve(pair.cross_times_o(v_hat), ridge).float()
    return round_weight(tf_o.forward(target), tf_o.hessian(h_hat.hessian()), dtype, how)


OUTER_ROWS = 128  # rows of H W whose mean term is added at once (a temporary under the allocator's mmap threshold)


@dataclasses.dataclass
class HeadMoments:
    """E[z_a^T z_b] over the concatenated query heads: one d x d block per KV group (its query
    heads share it) plus the outer product of the means. Products never form the dense matrix."""

    blocks: torch.Tensor  # [kv, d, d] float64
    mean_a: torch.Tensor  # [heads * d]
    mean_b: torch.Tensor  # [heads * d]
    group: int  # query heads per KV head

    def times(self, w: torch.Tensor) -> torch.Tensor:
        """H @ W for W[heads * d, N] (float64)."""
        kv, d, _ = self.blocks.shape
        n = w.shape[1]
        out = (self.blocks.unsqueeze(1) @ w.reshape(kv, self.group, d, n)).reshape(-1, n)
        right = self.mean_b @ w
        # The means' outer product is added in place, a few rows at a time: a buffer of H's size is a
        # fresh mapping whose pages cost more than the addition (same sums as out + outer).
        for r in range(0, out.shape[0], OUTER_ROWS):
            out[r : r + OUTER_ROWS].add_(torch.outer(self.mean_a[r : r + OUTER_ROWS], right))
        return out

    def quad(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """tr(A^T H B)."""
        return float(self.times(b).mul_(a).sum())

    def diagonal(self) -> torch.Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).repeat_interleave(self.group, 0).reshape(-1) + self.mean_a * self.mean_b

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks.repeat_interleave(self.group, 0)) + torch.outer(self.mean_a, self.mean_b)

    def hessian(self) -> rounding.BlockLowRank:
        """E[z^T z] of one activation (mean_a = mean_b) as GPTQ takes it: a d x d block per query head
        plus the mean direction, in float32, never K x K."""
        return rounding.BlockLowRank(self.blocks.repeat_interleave(self.group, 0).float(), self.mean_a.float())

    def solve(self, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
        """(H + ridge I)^-1 RHS: per-block solves, the mean term by Sherman-Morrison."""
        kv, d, _ = self.blocks.shape
        n = rhs.shape[1]
        p = (self.blocks + ridge * torch.eye(d, dtype=self.blocks.dtype, device=self.blocks.device)).unsqueeze(1)
        p_rhs = torch.linalg.solve(p, rhs.reshape(kv, self.group, d, n)).reshape(-1, n)
        p_u = torch.linalg.solve(p, self.mean_a.reshape(kv, self.group, d, 1)).reshape(-1)
        return p_rhs - torch.outer(p_u, (self.mean_b @ p_rhs) / (1.0 + self.mean_b @ p_u))


MOMENTS_KEPT = 5  # rounded V^ whose moments a Pair keeps: the transform candidates', one round_pair's alternations


class Pair:
    """Statistics of the attention output z = mix(x V) + b per query head, for V and a rounded V^.

    The value bias b (Qwen 2) is not rounded, but it shifts z's mean, which weighs O's rounding:
    z W_o - z^ O^ carries b (W_o - O^).
    """

    def __init__(self, x: stats.Moments, w_v: torch.Tensor, w_o: torch.Tensor, heads: int, d: int, bias=None, dtype=torch.float64):
        self.x, self.w_v, self.w_o, self.heads, self.d, self.dtype = x, w_v, w_o, heads, d, dtype
        self.bias = torch.zeros(w_v.shape[1], dtype=dtype, device=w_v.device) if bias is None else bias.to(dtype)
        self.kv = w_v.shape[1] // d
        self.group = heads // self.kv
        self._cov = x.dense_cov().to(dtype)
        self._mean = x.mean.to(dtype)
        w_v64 = w_v.to(dtype)
        self._cov_v, self._mean_v = self._cov @ w_v64, self._mean @ w_v64  # C V and m V: every cross term reuses them
        self._w_o = w_o.to(dtype)
        self.h_true = self.second(w_v, w_v)
        self.energy = self.h_true.quad(self._w_o, self._w_o)  # E||z W_o||^2: the pair's reference
        self._seen: list[list] = []  # [V^, its E[z^^T z^], E[z^^T z], that times W_o], the V^ seen last first

    def columns(self, idx: torch.Tensor, dtype) -> "Pair":
        """The same pair for O's columns `idx` only (the pair error is a sum over them), in `dtype`."""
        return Pair(self.x, self.w_v, self.w_o[:, idx], self.heads, self.d, self.bias, dtype)

    def value_hessian(self) -> torch.Tensor:
        """E over the mix of x^T x: what weighs V's rounding error inside the pair."""
        c = stats.ATTENTION_CONCENTRATION
        return (c * self._cov + torch.outer(self.x.mean, self.x.mean)).float()

    def second(self, a: torch.Tensor, b: torch.Tensor) -> HeadMoments:
        """E[z_a^T z_b] for z_a = mix(x A), z_b = mix(x B): block-diagonal covariance + means."""
        a64 = a.to(self.dtype)
        if b is self.w_v:
            cov_b, mean_b = self._cov_v, self._mean_v
        else:
            b64 = a64 if b is a else b.to(self.dtype)  # one float64 copy where both sides are the same V^
            cov_b, mean_b = self._cov @ b64, self._mean @ b64
        k, kv, d = a64.shape[0], self.kv, self.d
        blocks = a64.reshape(k, kv, d).permute(1, 2, 0) @ cov_b.reshape(k, kv, d).permute(1, 0, 2)  # [kv, d, d]
        per_head = lambda m: m.reshape(kv, d).repeat_interleave(self.group, 0).reshape(-1)  # noqa: E731
        return HeadMoments(
            stats.ATTENTION_CONCENTRATION * blocks,
            per_head(self._mean @ a64 + self.bias),
            per_head(mean_b + self.bias),
            self.group,
        )

    def moments_of(self, v_hat: torch.Tensor) -> tuple[HeadMoments, HeadMoments]:
        """(E[z^^T z^], E[z^^T z]) for a rounded V^; the last few are kept (the alternations come back to them)."""
        seen = self._seen_entry(v_hat)
        return seen[1], seen[2]

    def cross_times_o(self, v_hat: torch.Tensor) -> torch.Tensor:
        """E[z^^T z] W_o for a rounded V^ (O's least-squares right-hand side, and every pair error
        with this V^), kept with its moments."""
        seen = self._seen_entry(v_hat)
        if seen[3] is None:
            seen[3] = seen[2].times(self._w_o)
        return seen[3]

    def _seen_entry(self, v_hat: torch.Tensor) -> list:
        for seen in self._seen:
            if seen[0] is v_hat:
                return seen
        for seen in self._seen:
            seen[3] = None  # a layer-sized product: kept for the newest V^ only (O is rounded and scored with it)
        self._seen = [[v_hat, self.second(v_hat, v_hat), self.second(v_hat, self.w_v), None], *self._seen[: MOMENTS_KEPT - 1]]
        return self._seen[0]

    def value_target(self, o_hat: torch.Tensor) -> torch.Tensor:
        """argmin over V of the pair error for fixed O^: per KV group, V_g (sum_h W_o,h O^_h^T) (sum_h O^_h O^_h^T)^-1."""
        d = self.d
        cols = []
        for g in range(self.kv):
            heads = range(g * self.group, (g + 1) * self.group)
            wo = torch.cat([self.w_o[h * d : (h + 1) * d] for h in heads], dim=1).double()
            oh = torch.cat([o_hat[h * d : (h + 1) * d] for h in heads], dim=1).double()
            m = oh @ oh.t()
            m = m + max(1e-8 * float(m.diagonal().mean()), 1e-30) * torch.eye(d, device=m.device, dtype=m.dtype)
            cols.append(self.w_v[:, g * d : (g + 1) * d].double() @ torch.linalg.solve(m, oh @ wo.t()).t())
        return torch.cat(cols, dim=1).float()

    def error_tensor(self, v_hat: torch.Tensor, o_hat: torch.Tensor, sample: "pair_loss.RowSample | None" = None) -> torch.Tensor:
        """The pair error as a differentiable tensor (the learners' loss, its gradient written out); with a
        `sample` of V's rows, `v_hat` holds those rows only and the rest count as unrounded."""
        sample = sample or pair_loss.RowSample.of(self, torch.arange(self.w_v.shape[0], device=self.w_v.device))
        return pair_loss.PairLoss.apply(v_hat - self.w_v[sample.rows].to(v_hat.dtype), o_hat, sample)

    def error(self, v_hat, o_hat) -> float:
        """E||z W_o - z^ O^||^2 = tr(W_o^T H W_o) - 2 tr(O^^T C W_o) + tr(O^^T H^ O^)."""
        h_hat, _ = self.moments_of(v_hat)
        oh = o_hat.to(self.dtype)
        cross = self.cross_times_o(v_hat)
        product = h_hat.times(oh)
        quad = float(product.mul_(oh).sum())
        total = self.energy - 2 * float(torch.mul(oh, cross, out=product).sum()) + quad  # one buffer for both sums
        return max(total, 0.0)
