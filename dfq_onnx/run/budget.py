"""Mixed precision under a size budget: one format per linear, chosen from the weights alone.

A budget is stored bits per quantized weight (`--target-bits`, counted as the report counts them:
codes, scales and zero points) or the written model's bytes (`--target-size`). Every linear of
the decoder layers is a site; each candidate format gets an estimated loss (quant/sensitivity.py:
round-to-nearest's centred relative proxy under the propagated statistics, times the KL a unit of it
costs for the role, times the method's measured reduction for the role) and a cost;
quant/allocate.py chooses the formats (a multiple-choice knapsack with a bound on its distance to
the optimum). The choice becomes per-site overrides of the recipe, and the method then runs once,
on the chosen formats. With --lm-head int4|int8 the lm_head takes part (at 4 bits up to the
policy's); linears outside the layers and excluded linears keep their format and count as fixed cost.
"""

from __future__ import annotations

import dataclasses
import re
import time

import onnx_ir as ir
import torch

from .. import fast_path, methods, report
from ..config import OutputFormat, QuantFormat, Recipe, SiteOverride
from ..errors import DfqError
from ..graph import load
from ..graph.sites import Linear, ModelSites
from ..progress import ProgressFn
from ..quant import allocate, sensitivity
from . import prior
from .units import head_unit, layer_units
from .weights import WeightReader, torch_dtype

DEFAULT_BITS = (2, 4, 8)  # 3-bit codes sit in 4-bit containers: the same bytes as 4-bit, more loss
DEFAULT_BLOCKS = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Budget:
    bits: float | None = None  # stored bits per quantized weight
    size: int | None = None  # bytes of the written model (graph and data)
    formats: tuple[QuantFormat, ...] = ()  # the candidates; empty: default_formats(recipe)
    weighting: str = "relative"  # sensitivity.WEIGHTINGS

    def __post_init__(self) -> None:
        if (self.bits is None) == (self.size is None):
            raise DfqError("give one budget: --target-bits B or --target-size SIZE")
        if self.bits is not None and not 1.0 < self.bits <= 32.0:
            raise DfqError(f"--target-bits {self.bits}: give stored bits per weight, e.g. 3.5 (above 1, at most 32)")
        if self.size is not None and self.size <= 0:
            raise DfqError(f"--target-size {self.size}: give a positive size, e.g. 1.5GB or 800MiB")
        if self.weighting not in sensitivity.WEIGHTINGS:
            raise DfqError(f"unknown weighting '{self.weighting}': use {' or '.join(sensitivity.WEIGHTINGS)}")

    def describe(self) -> str:
        return f"{self.bits:g} bits/weight" if self.bits is not None else f"{self.size / 2**20:.1f} MiB"


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'1.5GB', '800MiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise DfqError(f"--target-size {text!r}: give a size such as 1.5GB, 800MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_formats(text: str) -> tuple[QuantFormat, ...]:
    """'4:128:asym,2:64:asym,8:32:sym' -> formats (bits:block:sym|asym)."""
    out = []
    for item in filter(None, (p.strip() for p in str(text).split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[2] not in ("sym", "asym") or not (parts[0].isdigit() and parts[1].isdigit()):
            raise DfqError(f"--target-formats item '{item}': write bits:block:sym or bits:block:asym, e.g. 4:128:asym")
        out.append(QuantFormat(int(parts[0]), int(parts[1]), parts[2] == "sym"))
    if not out:
        raise DfqError("--target-formats is empty: give e.g. 2:64:asym,4:128:asym,8:128:sym")
    return tuple(dict.fromkeys(out))


def default_formats(recipe: Recipe) -> tuple[QuantFormat, ...]:
    """The candidates when none are given: 2-, 4- and 8-bit at blocks 32/64/128, symmetric and not;
    for a recipe in the CUDA fast path's layout (the default), only the layouts that path runs."""
    every = [QuantFormat(b, g, s) for b in DEFAULT_BITS for g in DEFAULT_BLOCKS for s in (True, False)]
    if recipe.output_format == OutputFormat.MATMULNBITS and _cuda_layout(recipe.quant):
        return tuple(f for f in every if _cuda_layout(f))
    return tuple(every)


def _cuda_layout(fmt: QuantFormat) -> bool:
    """Whether the format itself is one the CUDA GEMM path runs (shapes and dtypes aside)."""
    return not fast_path.cuda_gemm_misses(fmt, fmt.block_size, fast_path.N_MULTIPLE, True)


def stored_bits(fmt: QuantFormat, k: int, n: int, scale_bits: int) -> float:
    """Bits of a quantized W[K, N] as the report counts them (report.stored_bits)."""
    return report.stored_bits(fmt.container_bits, fmt.block_size, fmt.symmetric, k, n, scale_bits)


@dataclasses.dataclass
class SiteChoice:
    name: str
    role: str
    layer: int | None  # None: the lm_head
    k: int
    n: int
    format: QuantFormat
    estimated_loss: float
    share: float
    rtn_relative_error: float  # round-to-nearest's relative proxy at the chosen format


@dataclasses.dataclass
class Allocation:
    """The allocation: a format per site, the budget it meets and what was estimated."""

    budget: Budget
    sites: list[SiteChoice]
    budget_bits: float  # bits the allocated sites may take
    fixed_bits: float  # bits of every other reported linear (lm_head, excluded, outside the layers)
    weights: int  # weights of every reported linear
    solution: allocate.Allocation
    seconds: float
    formats: tuple[QuantFormat, ...]
    estimates: dict[str, dict[str, float]]  # site -> format label -> estimated loss (every candidate that fits)
    narrowest_bits: int = 0  # no site was offered fewer bits: the budget affords every site this many

    @property
    def bits_per_weight(self) -> float:
        return (self.solution.cost + self.fixed_bits) / max(self.weights, 1)

    def overrides(self) -> tuple[SiteOverride, ...]:
        layers = lambda s: () if s.layer is None else (s.layer,)  # noqa: E731  the lm_head has no layer
        return tuple(SiteOverride((s.role,), layers(s), s.format.bits, s.format.block_size, s.format.symmetric) for s in self.sites)

    def to_dict(self) -> dict:
        return {
            "target": self.budget.describe(),
            "weighting": self.budget.weighting,
            "estimated_bits_per_weight": self.bits_per_weight,
            "estimated_loss": self.solution.loss,
            "lower_bound": self.solution.bound,
            "gap": self.solution.gap,
            "seconds": self.seconds,
            "candidates": [format_label(f) for f in self.formats],
            "narrowest_bits": self.narrowest_bits,
            "estimated": "per site and format: round-to-nearest's relative proxy under the propagated statistics, "
            f"times {'the sublayer share of the residual stream' if self.budget.weighting == 'residual' else 'the KL per unit of it measured for the role'}, "
            "times the method's measured reduction for the role",
            "measured": "the method's proxy on the chosen format (sites[].rel_error) and the written bits",
            "sites": [
                {"name": s.name, "role": s.role, "layer": s.layer, "format": format_label(s.format),
                 "estimated_loss": s.estimated_loss, "share": s.share, "rtn_relative_error": s.rtn_relative_error}
                for s in self.sites
            ],  # fmt: skip
        }

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sites:
            out[format_label(s.format)] = out.get(format_label(s.format), 0) + 1
        return dict(sorted(out.items()))


def format_label(fmt: QuantFormat) -> str:
    return f"int{fmt.bits} g{fmt.block_size} {'sym' if fmt.symmetric else 'asym'}"


def choose_formats(
    model: ir.Model, sites: ModelSites, recipe: Recipe, budget: Budget, device: str = "cpu",
    progress: ProgressFn | None = None, graph_bytes: int = 0,
) -> Allocation:  # fmt: skip
    """Estimate every site under every candidate format and choose the formats (nothing is written).
    `graph_bytes` (the input's .onnx file) is kept free under a --target-size, with room for the
    online rotations the method may insert."""
    started = time.perf_counter()
    reader = WeightReader(model.graph, sites, device)
    formats = budget.formats or default_formats(recipe)
    units = [u for u in layer_units(sites, model.graph) if u.layer is not None]
    allocated = {lin.node for u in units for lin in u.linears if not recipe.excludes(lin.node, lin.role.value)}
    head = head_unit(sites, recipe)
    head_formats = [f for f in formats if 4 <= f.bits <= recipe.lm_head.bits] if head else []  # --lm-head bounds its bits
    head_formats = [f for f in head_formats if head.linears[0].k % f.block_size == 0]
    if head_formats:
        allocated.add(head.linears[0].node)
    reported = [lin for lin in sites.linears.values() if lin.node != sites.lm_head or head is not None]  # a kept lm_head is not counted
    fixed = sum(_fixed_bits(lin, recipe, reader, sites) for lin in reported if lin.node not in allocated)
    weights = sum(lin.k * lin.n for lin in reported)
    residual = prior.initial_statistics(reader, recipe)
    choices: list[tuple[Linear, sensitivity.SiteStatistics, list[QuantFormat], list[float]]] = []
    total = sum(len(u.linears) for u in units)
    for unit in units:
        stats_of, residual = prior.site_statistics(reader, recipe, unit, residual)
        for lin in unit.linears:
            if lin.node not in allocated:
                continue
            fits = [f for f in formats if f.block_size <= lin.k and lin.k % f.block_size == 0]
            if not fits:
                raise DfqError(f"{lin.node}: no candidate format fits K={lin.k}; give --target-formats with a block dividing it")
            choices.append((lin, stats_of[lin.node], fits, sensitivity.relative_errors(stats_of[lin.node], fits)))
        if progress:
            progress(f"estimate {unit.label}", len(choices), total)
    if head_formats:  # the statistics at the final norm weigh the lm_head's error; it writes the logits (share 1)
        lin = head.linears[0]
        gain = reader.gains(head).get(head.head_norm.initializer) if head.head_norm else None
        st = sensitivity.head_site(_head_sample(reader, lin), residual, gain, torch_dtype(reader.activation_dtype(lin)))
        choices.append((lin, st, head_formats, sensitivity.relative_errors(st, head_formats)))
    scale_bits = {lin.node: reader.scale_bits(lin) for lin, *_ in choices}
    if budget.bits is not None:
        budget_bits = budget.bits * weights - fixed
    else:  # every tensor that stays as it is, then the fixed quantized linears, take their bytes first
        quantized = [lin for lin in reported if not recipe.excludes(lin.node, lin.role.value)]
        staying = load.weight_bytes(model) - sum(_float_bytes(model, lin) for lin in quantized)
        fixed_quantized = sum(_fixed_bits(lin, recipe, reader, sites) for lin in quantized if lin.node not in allocated)
        reserve = graph_bytes + _rotation_bytes(units, recipe)
        budget_bits = (budget.size - staying - reserve) * 8.0 - fixed_quantized
    choices, narrowest = _no_lower_than_affordable(choices, scale_bits, budget_bits)
    groups = [
        [allocate.Option(stored_bits(f, lin.k, lin.n, scale_bits[lin.node]), _loss(recipe, st, lin.role.value, f, e, budget)) for f, e in zip(fits, errs)]
        for lin, st, fits, errs in choices
    ]
    try:
        solution = allocate.solve(groups, budget_bits)
    except allocate.Infeasible as exc:
        least = f"{(exc.cheapest + fixed) / max(weights, 1):.2f} bits/weight"
        if budget.size is not None:
            least = f"a model of {(budget.size * 8 + exc.cheapest - budget_bits) / 8 / 2**20:.1f} MiB"
        raise DfqError(
            f"budget {budget.describe()} is below the smallest mix of the candidate formats ({least}): "
            "raise the budget or add smaller formats with --target-formats"
        ) from None
    chosen = [
        SiteChoice(lin.node, lin.role.value, lin.layer, lin.k, lin.n, fits[i], groups[g][i].loss, st.share, errs[i])
        for g, ((lin, st, fits, errs), i) in enumerate(zip(choices, solution.choice))
    ]  # fmt: skip
    estimates = {lin.node: {format_label(f): o.loss for f, o in zip(fits, group)} for (lin, _, fits, _), group in zip(choices, groups)}
    return Allocation(budget, chosen, budget_bits, fixed, weights, solution, time.perf_counter() - started, formats, estimates, narrowest)


def _no_lower_than_affordable(choices, scale_bits: dict[str, int], budget_bits: float) -> tuple[list, int]:
    """Drop every candidate of fewer bits than the widest the budget affords every site at once (its
    cheapest block each): a budget that fits all sites at 4 bits sends none to 2. A 2-bit linear costs
    10-20x its 4-bit KL and the estimate of that is its least reliable part: on Gemma 3 270M at 4.28
    bits/weight one 2-bit down projection the estimate chose raised the KL by 15% (Persuasion).
    Returns the choices left and that width (0: the budget affords no width everywhere)."""
    widths = sorted({f.bits for _, _, fits, _ in choices for f in fits}, reverse=True)
    for bits in widths:
        least = 0.0
        for lin, _, fits, _ in choices:
            wide = [stored_bits(f, lin.k, lin.n, scale_bits[lin.node]) for f in fits if f.bits >= bits]
            least += min(wide or [stored_bits(f, lin.k, lin.n, scale_bits[lin.node]) for f in fits])
        if least <= budget_bits:
            break
    else:
        return choices, 0
    kept = []
    for lin, st, fits, errs in choices:
        pairs = [(f, e) for f, e in zip(fits, errs) if f.bits >= bits] or list(zip(fits, errs))
        kept.append((lin, st, [f for f, _ in pairs], [e for _, e in pairs]))
    return kept, bits


def _loss(recipe: Recipe, st: sensitivity.SiteStatistics, role: str, fmt: QuantFormat, rel: float, budget: Budget) -> float:
    return sensitivity.estimated_loss(st, role, fmt, rel, budget.weighting, method=methods.method_for(recipe.method).optimises_rounding)


def _fixed_bits(lin: Linear, recipe: Recipe, reader: WeightReader, sites: ModelSites) -> float:
    if recipe.excludes(lin.node, lin.role.value):
        return float(lin.k * lin.n * (16 if lin.weight.dtype == "FLOAT16" else 32))
    head = lin.node == sites.lm_head
    return stored_bits(recipe.site_format(lin.role.value, lin.layer, len(sites.layers()), head), lin.k, lin.n, reader.scale_bits(lin))


def _head_sample(reader: WeightReader, lin: Linear):
    """The lm_head's W on the estimate's columns only, read from storage in pieces (a 262k-vocabulary
    head is never whole in float32); the estimate of these columns is the estimate of the whole."""
    wanted = sensitivity.estimate_columns(lin.n)
    parts, start = [], 0
    for piece in reader.column_chunks(lin.weight.initializer, lin.weight.transposed, methods.HEAD_CHUNK):
        end = start + piece.shape[1]
        parts.append(piece[:, wanted[(wanted >= start) & (wanted < end)] - start])
        start = end
    return torch.cat(parts, dim=1)


def _float_bytes(model: ir.Model, lin: Linear) -> int:
    value = model.graph.initializers[lin.weight.initializer].const_value
    return value.nbytes if value is not None else 0


def _rotation_bytes(units, recipe: Recipe) -> int:
    """At most what the online rotations of the MLP inputs add (one [K/b, b, b] float32 tensor each)."""
    online = recipe.method.online
    total = 0
    for unit in units:
        if unit.mlp is None:
            continue
        for lin in unit.linears:
            if ("gate_up" in online and lin.node == unit.mlp.gate) or ("down" in online and lin.node == unit.mlp.down):
                total += lin.k * recipe.method.online_block * 4
    return total
