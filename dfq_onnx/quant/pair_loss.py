"""The V/O pair error E||z W_o - z^ O^||^2 as a differentiable scalar with its gradient written out.

The V/O learner evaluates it at every step. Its one large product is C V^ (K x K by K x kv d);
autograd would form two more of that size on the way back, while the gradient needs only C V^,
already computed, and C V, fixed per layer. Per KV group g and query head h of it:

    L = E - 2 [sum_h tr(O^_h^T Cb_g W_o,h) + s.r] + sum_h tr(O^_h^T Hb_g O^_h) + s.s
    Cb_g = c V^_g^T (C V_g),  Hb_g = c V^_g^T (C V^_g),  s = sum_h mu^_h^T O^_h,  r = sum_h mu_h^T W_o,h

(mu^_h = m V^_g + b_g, the mean of z^ at head h; c the attention concentration), and

    dL/dV^_g = 2c [C V^_g A_g - C V_g B_g] + m (x) sum_h O^_h (2s - 2r),   A_g = sum_h O^_h O^_h^T,  B_g = sum_h W_o,h O^_h^T
    dL/dO^_h = 2 [Hb_g O^_h - Cb_g W_o,h] + mu^_h (x) (2s - 2r).
"""

from __future__ import annotations

import torch

from . import stats


class PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v_hat: torch.Tensor, o_hat: torch.Tensor, pair) -> torch.Tensor:
        kv, d, group, c = pair.kv, pair.d, pair.group, stats.ATTENTION_CONCENTRATION
        k, m = v_hat.shape[0], o_hat.shape[1]
        v, o = v_hat.to(pair.dtype), o_hat.to(pair.dtype)
        cov_v_hat = pair._cov @ v  # C V^: the one K x K product
        by_group = lambda x: x.reshape(k, kv, d).permute(1, 0, 2)  # noqa: E731  [K, kv d] -> [kv, K, d]
        v_g = by_group(v)
        hb = c * v_g.transpose(1, 2) @ by_group(cov_v_hat)  # [kv, d, d]
        cb = c * v_g.transpose(1, 2) @ by_group(pair._cov_v)
        oh = o.reshape(kv, group, d, m)
        wo = pair._w_o.reshape(kv, group, d, m)
        mu_hat = (pair._mean @ v + pair.bias).reshape(kv, d)
        mu = (pair._mean @ pair.w_v.to(pair.dtype) + pair.bias).reshape(kv, d)
        s = torch.einsum("kd,kgdm->m", mu_hat, oh)
        r = torch.einsum("kd,kgdm->m", mu, wo)
        cross = (oh * (cb.unsqueeze(1) @ wo)).sum() + s @ r
        quad = (oh * (hb.unsqueeze(1) @ oh)).sum() + s @ s
        ctx.save_for_backward(v, oh, wo, cov_v_hat, cb, hb, mu_hat, s - r)
        ctx.pair, ctx.dtypes = pair, (v_hat.dtype, o_hat.dtype)
        return pair.energy - 2 * cross + quad

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, oh, wo, cov_v_hat, cb, hb, mu_hat, gap = ctx.saved_tensors
        pair = ctx.pair
        kv, d, c = pair.kv, pair.d, stats.ATTENTION_CONCENTRATION
        k, m = v.shape[0], oh.shape[-1]
        by_group = lambda x: x.reshape(k, kv, d).permute(1, 0, 2)  # noqa: E731
        a = (oh @ oh.transpose(-1, -2)).sum(1)  # [kv, d, d]
        b = (wo @ oh.transpose(-1, -2)).sum(1)
        d_mu = (oh @ (2 * gap)).sum(1)  # [kv, d]: the mean's share, per KV group
        d_v = 2 * c * (by_group(cov_v_hat) @ a - by_group(pair._cov_v) @ b)  # [kv, K, d]
        d_v = d_v.permute(1, 0, 2).reshape(k, kv * d) + torch.outer(pair._mean, d_mu.reshape(-1))
        d_o = 2 * (hb.unsqueeze(1) @ oh - cb.unsqueeze(1) @ wo) + mu_hat[:, None, :, None] * (2 * gap)
        d_o = d_o.reshape(-1, m)
        return (grad * d_v).to(ctx.dtypes[0]), (grad * d_o).to(ctx.dtypes[1]), None
