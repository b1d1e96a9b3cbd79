"""What the math needs to know of one layer, as plain tensors and names (filled by the caller from
the graph's sites; the math never sees the graph).

Names are opaque keys: a linear's key indexes `LayerWeights.weights`, a gain's key indexes
`LayerWeights.gains`. Weights are W[K, N] (x W), gains multiplicative (1 + w already added).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..config import HessianForm
from . import stats
from .site import SiteOutcome


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # q|k|v packed in one linear, split by qkv_split
    o: str | None = None
    qkv_split: tuple[int, int, int] | None = None
    head_dim: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    rope: str = "unknown"  # "half" (split halves), "interleaved" or "unknown"
    rotary_dim: int | None = None  # rotated width of a head (partial rotary), None: the whole head
    qk_norm: bool = False  # per-head norms on q and k (they block the Q/K rotations)
    gain: str | None = None  # the input norm's gain
    gain_foldable: bool = False  # it may be rewritten (a diagonal scaling folds into it)
    post_gain: str | None = None  # the norm on the sublayer's output (Gemma's post-norms)
    post_norm: bool = False


@dataclasses.dataclass(frozen=True)
class MlpGeometry:
    gate: str
    up: str
    down: str
    gate_columns: tuple[int, int] | None = None  # gate == up: one fused linear, its halves' column ranges
    up_columns: tuple[int, int] | None = None
    activation: str = "gelu_tanh"
    gain: str | None = None
    gain_foldable: bool = False
    post_gain: str | None = None
    post_norm: bool = False

    @property
    def fused(self) -> bool:
        return self.gate == self.up


@dataclasses.dataclass
class LayerWeights:
    """One layer: its linears, the gains around them, and how they are arranged."""

    weights: Mapping[str, torch.Tensor]  # may read each weight on first use
    scale_dtypes: dict[str, torch.dtype]
    gains: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> its output bias [N]
    attention: AttentionGeometry | None = None
    mlp: MlpGeometry | None = None
    # linear -> the statistics of its input measured on the model's own samples; where given they
    # replace the propagated ones for that input (the residual is still propagated for the rest)
    inputs: Mapping[str, stats.Moments] = dataclasses.field(default_factory=dict)

    def gain(self, key: str | None) -> torch.Tensor | None:
        return None if key is None else self.gains.get(key)

    @property
    def post_normed(self) -> bool:
        """Every sublayer ends in a post-norm: the propagated statistics are re-anchored by known
        gains at each step (see config.DiagonalPrior)."""
        parts = [p for p in (self.attention, self.mlp) if p is not None]
        return bool(parts) and all(p.post_norm for p in parts)

    def trusted(self, linear: str | None) -> bool:
        """Whether the statistics at `linear`'s input may be trusted channel by channel (whitening):
        measured ones always, propagated ones where post-norms anchor them."""
        return self.post_normed or (linear is not None and linear in self.inputs)

    def input_of(self, linear: str | None, propagated: stats.Moments) -> stats.Moments:
        """The measured statistics at `linear`'s input, else `propagated`."""
        measured = self.inputs.get(linear) if linear is not None else None
        return measured if measured is not None else propagated

    def form_of(self, linear: str | None, form: HessianForm) -> HessianForm:
        """The Hessian form for `linear`'s input: BY_SOURCE resolved by where its statistics come from."""
        if form != HessianForm.BY_SOURCE:
            return form
        return HessianForm.DENSE if linear is not None and linear in self.inputs else HessianForm.DIAGONAL_PLUS_MEAN


@dataclasses.dataclass
class LayerResult:
    sites: dict[str, SiteOutcome]
    gains: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # gain key -> new gain to fold
    residual: stats.Moments | None = None  # the residual stream after this layer
    online: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> block T (x' = x T)
    biases: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # linear -> bias moved with its columns
