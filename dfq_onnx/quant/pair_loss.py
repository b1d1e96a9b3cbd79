"""The V/O pair error E||z W_o - z^ O^||^2 as a differentiable scalar, from V's rounding error on a
sample of its rows, with its gradient written out.

The V/O learner evaluates it at every step. Written in E = V^ - V (zero outside the sampled rows S)
it needs no K x K product: with P = C V (fixed per layer) and the moments of z,

    Cb_g = c (V^T C V + E^T P_S)_g,   Hb_g = c (V^T C V + P_S^T E + E^T (P_S + C_SS E))_g,
    mu^ = m V + b + m_S E,            s = sum_h mu^_h^T O^_h,  r = sum_h mu_h^T W_o,h,
    L = energy - 2 [sum_h tr(O^_h^T Cb_g W_o,h) + s.r] + sum_h tr(O^_h^T Hb_g O^_h) + s.s,

per KV group g and query head h of it (c the attention concentration), and

    dL/dE_g = 2c [(C V^)_S,g A_g - P_S,g B_g] + m_S (x) sum_h O^_h (2s - 2r),  A_g = sum_h O^_h O^_h^T,  B_g = sum_h W_o,h O^_h^T
    dL/dO^_h = 2 [Hb_g O^_h - Cb_g W_o,h] + mu^_h (x) (2s - 2r).

With every row sampled it is the pair error itself; on a wide V a sample of whole quantization
blocks (their rounding does not depend on the other rows) costs |S|^2 instead of K^2 per step.
"""

from __future__ import annotations

import dataclasses

import torch

from . import stats


@dataclasses.dataclass
class RowSample:
    """What the loss needs of a Pair for V's rows `rows`, computed once per learner."""

    rows: torch.Tensor  # indices into V's rows
    cov_rows: torch.Tensor  # C[S, S]
    cov_v_rows: torch.Tensor  # (C V)[S]
    mean_rows: torch.Tensor  # m[S]
    base: torch.Tensor  # c (V^T C V) per KV group [kv, d, d]
    mu: torch.Tensor  # m V + b per KV group [kv, d]
    w_o: torch.Tensor
    energy: float
    kv: int
    d: int
    group: int

    @classmethod
    def of(cls, pair, rows: torch.Tensor) -> "RowSample":
        mu = (pair._mean @ pair.w_v.to(pair.dtype) + pair.bias).reshape(pair.kv, pair.d)
        return cls(rows, pair._cov[rows][:, rows], pair._cov_v[rows], pair._mean[rows], pair.h_true.blocks, mu,
                   pair._w_o, pair.energy, pair.kv, pair.d, pair.group)  # fmt: skip


class PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, error: torch.Tensor, o_hat: torch.Tensor, sample: RowSample) -> torch.Tensor:
        kv, d, group, c = sample.kv, sample.d, sample.group, stats.ATTENTION_CONCENTRATION
        rows, m = error.shape[0], o_hat.shape[1]
        e, o = error.to(sample.base.dtype), o_hat.to(sample.base.dtype)
        by_group = lambda x: x.reshape(rows, kv, d).permute(1, 0, 2)  # noqa: E731  [S, kv d] -> [kv, S, d]
        cov_v_hat = sample.cov_v_rows + sample.cov_rows @ e  # (C V^)_S
        e_g, p_g = by_group(e), by_group(sample.cov_v_rows)
        cb = sample.base + c * e_g.transpose(1, 2) @ p_g  # [kv, d, d]
        hb = sample.base + c * (p_g.transpose(1, 2) @ e_g + e_g.transpose(1, 2) @ by_group(cov_v_hat))
        oh = o.reshape(kv, group, d, m)
        wo = sample.w_o.reshape(kv, group, d, m)
        mu_hat = sample.mu + (sample.mean_rows @ e).reshape(kv, d)
        s = torch.einsum("kd,kgdm->m", mu_hat, oh)
        r = torch.einsum("kd,kgdm->m", sample.mu, wo)
        cross = (oh * (cb.unsqueeze(1) @ wo)).sum() + s @ r
        quad = (oh * (hb.unsqueeze(1) @ oh)).sum() + s @ s
        ctx.save_for_backward(oh, wo, cov_v_hat, cb, hb, mu_hat, s - r)
        ctx.sample, ctx.dtypes = sample, (error.dtype, o_hat.dtype)
        return sample.energy - 2 * cross + quad

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        oh, wo, cov_v_hat, cb, hb, mu_hat, gap = ctx.saved_tensors
        sample = ctx.sample
        kv, d, c = sample.kv, sample.d, stats.ATTENTION_CONCENTRATION
        rows, m = cov_v_hat.shape[0], oh.shape[-1]
        by_group = lambda x: x.reshape(rows, kv, d).permute(1, 0, 2)  # noqa: E731
        a = (oh @ oh.transpose(-1, -2)).sum(1)  # [kv, d, d]
        b = (wo @ oh.transpose(-1, -2)).sum(1)
        d_mu = (oh @ (2 * gap)).sum(1)  # [kv, d]: the mean's share, per KV group
        d_e = 2 * c * (by_group(cov_v_hat) @ a - by_group(sample.cov_v_rows) @ b)  # [kv, S, d]
        d_e = d_e.permute(1, 0, 2).reshape(rows, kv * d) + torch.outer(sample.mean_rows, d_mu.reshape(-1))
        d_o = 2 * (hb.unsqueeze(1) @ oh - cb.unsqueeze(1) @ wo) + mu_hat[:, None, :, None] * (2 * gap)
        return (grad * d_e).to(ctx.dtypes[0]), (grad * d_o.reshape(-1, m)).to(ctx.dtypes[1]), None
