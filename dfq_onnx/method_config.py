"""The method's configuration: what the math in quant/ reads, and the recipe's [method] section."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from .checks import check_seed, enum_value
from .errors import DfqError


class Method(str, enum.Enum):
    RTN = "rtn"  # round-to-nearest, byte-identical to ORT's DEFAULT quantizer
    CAFEQ = "cafeq"  # data-free transforms chosen from the weights, paired transforms, adaptive rounding


class DiagonalPrior(str, enum.Enum):
    """Where the diagonal search may whiten by the prior's per-channel importance (a = h^-alpha/2).

    Whitening trusts the prior channel by channel, and the prior is only as good as its propagation:
    anchored by a post-norm after every sublayer (Gemma 2/3) it follows real activations closely;
    through plain residual sums (Llama, Mistral, Qwen, Phi) it does not (tools/research/prior_vs_real.py),
    and whitening by it then costs more than it gains. Elsewhere only the weights' spread is used.
    """

    POST_NORM = "post-norm"  # only in layers whose sublayers end in a post-norm
    ALWAYS = "always"
    NEVER = "never"


class Rotation(str, enum.Enum):
    """The orthogonal blocks of the online and V/O transforms."""

    HADAMARD = "hadamard"
    RANDOM = "random"  # seeded random orthogonal blocks: the paper's "Random" baseline (--seed)


class HessianForm(str, enum.Enum):
    """What of the propagated statistics GPTQ rounds under."""

    DIAGONAL_PLUS_MEAN = "diagonal-plus-mean"  # diag(var) + m m^T: O(K) memory, O(K N) GPTQ
    DENSE = "dense"  # the covariance + m m^T: K x K, the off-diagonal terms too
    # dense where the statistics were measured (their off-diagonal terms are real: SmolLM2 int4 g128 asym,
    # Persuasion 8 windows, KL 0.152 -> 0.136), diagonal-plus-mean where propagated (measured better there)
    BY_SOURCE = "by-source"


class TokenPrior(str, enum.Enum):
    """How the propagated prior weighs the vocabulary rows the residual stream starts from: alike, or
    by the model's own next-token distribution at the prior's mean final state (one statistics pass
    first). Like DiagonalPrior, by default only where the prior is anchored by post-norms: on Gemma 3
    270M it lowers the KL at every setting, on SmolLM2 (pre-norm) it moves it both ways (BENCHMARKS.md)."""

    POST_NORM = "post-norm"  # self where every sublayer ends in a post-norm (Gemma 2/3), uniform elsewhere
    SELF = "self"
    UNIFORM = "uniform"


class Statistics(str, enum.Enum):
    """Where the statistics of each linear's input come from (with the propagated prior)."""

    PROPAGATED = "propagated"  # from the weights alone, carried layer by layer (stats.py): the paper's
    GENERATED = "generated"  # measured on sequences the model samples itself from its first token (run/self_statistics.py)


class Prior(str, enum.Enum):
    PROPAGATED = "propagated"  # activation statistics propagated through the network from its weights
    IDENTITY = "identity"  # Sigma = I: plain ||W - W_hat||^2


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The method and its knobs, read by the math itself (quant/); round-to-nearest ignores them."""

    # The defaults are every built-in recipe's method; the measurements behind them (KL to fp32 on the
    # tuning text, Persuasion) are noted beside each, and BENCHMARKS.md / docs/experiments hold the tables.
    name: Method = Method.CAFEQ
    prior: Prior = Prior.PROPAGATED  # identity prior: measured worse
    statistics: Statistics = Statistics.PROPAGATED  # generated: each linear's input measured on the model's own samples
    samples: int = 64  # generated: sequences the model samples (seeded by `seed`), all in one batch
    sample_length: int = 512  # generated: tokens per sequence, the first one the model's BOS
    temperature: float = 0.8  # generated: sampling temperature
    # uniform -> self on Persuasion 16 windows: Gemma 3 270M int4 g32 0.1018 -> 0.0963, int4 g128 0.1419 -> 0.1318,
    # int3 0.4173 -> 0.3840, int2 2.213 -> 2.007; SmolLM2 0.1390 -> 0.1391, 0.2128 -> 0.2109, 0.5361 -> 0.5533,
    # 3.053 -> 3.152 (so uniform where there are no post-norms)
    token_prior: TokenPrior = TokenPrior.POST_NORM  # the token distribution the prior starts from
    scale_search: bool = True  # per-block clipping / least-squares scales instead of min-max
    diagonal: bool = True  # free diagonal transforms: norm -> q/k/v, norm -> gate/up, up -> down
    diagonal_prior: DiagonalPrior = DiagonalPrior.POST_NORM  # where they may whiten by the prior (see the enum);
    # by the weights' spread elsewhere: SmolLM2 int3 g32, KL 1.080 -> 0.589; Gemma 3 unchanged
    vo_pairs: bool = True  # o rounded to compensate the rounded V of its KV group (alternating)
    vo_transform: bool = True  # free invertible T per KV head on the V/O pair (identity or Hadamard)
    qk_transform: bool = True  # free RoPE-commuting rotations of q/k pairs (no q/k norms)
    gptq: bool = True  # adaptive rounding with error feedback under the prior's Hessian
    gptq_damp: float = 0.3  # GPTQ's H + damp * mean(diag H) * I: less trust in the prior's per-channel values.
    # Persuasion 8 windows, damp 0.01 -> 0.3 (1.0 and 2 not better on average, worse on SmolLM2 int4): Gemma 3 270M
    # int4 g32 0.107 -> 0.103, int4 g128 0.151 -> 0.143, int3 0.441 -> 0.427, int2 2.35 -> 2.15; SmolLM2 int4
    # 0.148 -> 0.135, int3 0.584 -> 0.536, int2 3.19 -> 2.99
    alternations: int = 2  # V/O rounding steps: V, O given V^, then V given O^ ...
    online: tuple[str, ...] = ("down", "gate_up")  # inputs that may get an online block Hadamard (an inserted op);
    # 1.5% more multiply-adds on Gemma 3 270M; int4 g32: KL 0.137 -> 0.110, proxy of down -42%, gate/up -27%
    online_block: int = 32  # its largest block size (32, 64 and 128 measured equal; 32 costs least)
    online_min_gain: float = 0.05  # kept only where it lowers its linears' proxy by this fraction
    force_transforms: bool = False  # exactness checks: apply every free transform even when it does not pay
    hessian: HessianForm = HessianForm.BY_SOURCE  # the statistics' form GPTQ and the searches use
    rotation: Rotation = Rotation.HADAMARD  # the blocks of the online and V/O transforms
    seed: int = 0  # random blocks (rotation = "random") follow it: the same seed gives the same bytes
    # Learned transforms (quant/learn.py): Adam steps on the straight-through proxy (0: off) and rates. None
    # is on: each costs more time than it returns. The V/O block (x2 the time) lowers the pair's proxy by
    # 0.5-5.6% and moves the KL both ways (Gemma 3 270M, learned / searched: Persuasion 8 windows int4 g32
    # 0.1118 / 0.1144, int3 g32 asym 0.4689 / 0.4673; Pride and Prejudice 16 windows 0.1101 / 0.1079,
    # 0.4283 / 0.4351); diagonals (x3.3) and online blocks (x3.1): int4 g32 0.1133 and 0.1143 against 0.1165;
    # q/k angles (x2.5) were never kept on SmolLM2.
    learned_diagonal_steps: int = 0  # the norm and up/down diagonals, refined from the searched ones
    learned_diagonal_lr: float = 0.01  # on the log-scales
    learned_vo_steps: int = 0  # a general invertible T per KV head on the V/O pair, from the chosen block
    learned_vo_lr: float = 0.001
    learned_vo_objective: str = "pair"  # "pair": the rounded pair error (straight-through); "ranges": the smooth surrogate of block ranges
    learned_online_steps: int = 0  # general invertible blocks of the online transforms, from the Hadamard
    learned_online_lr: float = 0.001
    learned_qk_steps: int = 0  # the q/k RoPE rotation angle per pair, refined from the searched one (no q/k norms)
    learned_qk_lr: float = 0.01


@dataclasses.dataclass(frozen=True)
class FreeTransform:
    """One function-preserving transform the method may choose: the MethodConfig field that turns it
    on (and its value when off), and its learner's steps and rate (0 steps: searched only). A new
    transform is one entry here and its math in quant/; the off-switch (Rounding.untransformed),
    --fast and the recipe checks follow from this table."""

    name: str
    switch: str
    off: Any
    steps: str
    lr: str


FREE_TRANSFORMS = (
    FreeTransform("diagonal", "diagonal", False, "learned_diagonal_steps", "learned_diagonal_lr"),
    FreeTransform("q/k rotation", "qk_transform", False, "learned_qk_steps", "learned_qk_lr"),
    FreeTransform("V/O transform", "vo_transform", False, "learned_vo_steps", "learned_vo_lr"),
    FreeTransform("online rotation", "online", (), "learned_online_steps", "learned_online_lr"),  # an inserted op
)


def without_transforms(config: MethodConfig) -> MethodConfig:
    """The same method with every free transform off (the scale search and GPTQ kept)."""
    return dataclasses.replace(config, **{t.switch: t.off for t in FREE_TRANSFORMS})


def without_learners(config: MethodConfig) -> MethodConfig:
    """The same method with every learner off: each transform searched only (--fast)."""
    return dataclasses.replace(config, **{t.steps: 0 for t in FREE_TRANSFORMS})


def keeps(config: MethodConfig, trial: float, current: float) -> bool:
    """Whether a transform's trial replaces what it would change: where it lowers the proxy, or
    always when the recipe forces every transform (the exactness checks)."""
    return config.force_transforms or trial < current


def method_config_from(section: dict[str, Any]) -> MethodConfig:
    values = dict(section)
    values["name"] = enum_value(Method, values.get("name", Method.CAFEQ.value), "method")
    if "prior" in values:
        values["prior"] = enum_value(Prior, values["prior"], "method prior")
    if "statistics" in values:
        values["statistics"] = enum_value(Statistics, values["statistics"], "method statistics")
    for key, low in (("samples", 1), ("sample_length", 2)):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < low):
            raise DfqError(f"recipe [method] {key} must be a whole number >= {low}, not {values[key]!r}")
    if "temperature" in values and (not isinstance(values["temperature"], (int, float)) or isinstance(values["temperature"], bool) or values["temperature"] < 0):
        raise DfqError(f"recipe [method] temperature must be a number >= 0 (0: greedy), not {values['temperature']!r}")
    if "token_prior" in values:
        values["token_prior"] = enum_value(TokenPrior, values["token_prior"], "method token_prior")
    if "rotation" in values:
        values["rotation"] = enum_value(Rotation, values["rotation"], "method rotation")
    if "hessian" in values:
        values["hessian"] = enum_value(HessianForm, values["hessian"], "method hessian")
    if "seed" in values:
        check_seed(values["seed"], "recipe [method] seed")
    if "diagonal_prior" in values:
        values["diagonal_prior"] = enum_value(DiagonalPrior, values["diagonal_prior"], "method diagonal_prior")
    for key in ("scale_search", "diagonal", "vo_pairs", "vo_transform", "qk_transform", "gptq", "force_transforms"):
        if key in values and not isinstance(values[key], bool):
            raise DfqError(f"recipe [method] {key} must be true or false")
    if "online" in values:
        values["online"] = parse_online(values["online"])
    if "online_block" in values and (not isinstance(b := values["online_block"], int) or b < 8 or b & (b - 1)):
        raise DfqError(f"recipe [method] online_block must be a power of two >= 8, not {b!r}")
    if "alternations" in values and not 1 <= values["alternations"] <= 16:
        raise DfqError(f"recipe [method] alternations must be from 1 to 16, not {values['alternations']}")
    for key in (t.steps for t in FREE_TRANSFORMS):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or not 0 <= values[key] <= 10_000):
            raise DfqError(f"recipe [method] {key} must be a whole number of steps from 0 (off) to 10000, not {values[key]!r}")
    for key in (*(t.lr for t in FREE_TRANSFORMS), "gptq_damp"):
        if key in values and (not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or not values[key] > 0):
            raise DfqError(f"recipe [method] {key} must be a positive number (e.g. {getattr(MethodConfig, key)}), not {values[key]!r}")
    if values.get("learned_vo_objective", "pair") not in VO_OBJECTIVES:
        raise DfqError(f"recipe [method] learned_vo_objective must be one of {', '.join(VO_OBJECTIVES)}, not {values['learned_vo_objective']!r}")
    if "online_min_gain" in values and not isinstance(values["online_min_gain"], (int, float)):
        raise DfqError("recipe [method] online_min_gain must be a number (a fraction, e.g. 0.05)")
    return MethodConfig(**values)


ONLINE_SITES = ("down", "gate_up")
VO_OBJECTIVES = ("pair", "ranges")  # what the V/O learner descends (quant/learn.py)


def parse_online(value: Any) -> tuple[str, ...]:
    """Where online rotations may go: a list, or a comma-separated string ("none" for nowhere)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip() and str(i).strip() != "none"]
    if unknown := [i for i in items if i not in ONLINE_SITES]:
        raise DfqError(f"unknown online site(s) {unknown}: choose from {', '.join(ONLINE_SITES)}, or none")
    return tuple(dict.fromkeys(items))
