"""One unit from the graph to its plan: read the unit's weights, gains and biases, run the method
the recipe names, and turn what it returned into a UnitPlan (plain arrays). The graph is only read
here; passes write it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import methods
from ..config import QuantFormat, Recipe
from ..plan import UnitPlan
from ..quant import stats
from .plan_result import from_result
from .weights import LazyWeights, WeightReader, torch_dtype


@dataclasses.dataclass
class Planned:
    plan: UnitPlan
    residual: stats.Moments | None  # the statistics the next unit starts from
    rounded_float: dict[str, np.ndarray]  # linear -> the float W[K, N] that was rounded (exactness check only)


def plan_unit(reader: WeightReader, recipe: Recipe, unit: methods.Unit, residual: stats.Moments | None, keep_float: bool = False,
              inputs: dict[str, stats.Moments] | None = None) -> Planned:  # fmt: skip
    """Run the recipe's method on `unit` from the statistics `residual` (and `inputs`: linear -> its
    input's measured statistics, where measured); `keep_float`: the plan keeps the transformed float
    weights the exactness check reads."""
    t0 = time.perf_counter()
    head = unit.is_head
    fmt = recipe.head_format() if head else recipe.quant
    formats = {lin.node: recipe.site_format(lin.role.value, lin.layer, len(reader.sites.layers()), head) for lin in unit.linears}
    excluded = {lin.node for lin in unit.linears if not head and recipe.excludes(lin.node, lin.role.value)}
    method = methods.method_for(recipe.method)
    as_stored = method.reads_stored_layout and not head  # the head is read in float32, as ORT's quantizer does
    linears = {lin.node: lin for lin in unit.linears}
    weights = LazyWeights(linears, lambda name: reader.weight(linears[name], as_stored=as_stored))
    dtypes = {lin.node: reader.activation_dtype(lin) for lin in unit.linears}
    notes: list[str] = []
    embedding_ok = head and _embedding_quantizable(unit, fmt, notes)
    table = unit.embedding.initializer if embedding_ok and not unit.embedding.tied else None  # untied: its own codes
    scale_dtypes = {name: torch_dtype(dt) for name, dt in dtypes.items()}
    read = lambda name: (reader.embedding_table(unit) if name == table else weights[name]).to(reader.device)  # noqa: E731
    device_weights = LazyWeights([*linears, *([table] if table else [])], read)
    if table is not None:
        scale_dtypes[table] = scale_dtypes[unit.linears[0].node]
    data = methods.UnitInput(
        weights=device_weights,
        scale_dtypes=scale_dtypes,
        gains=reader.device_gains(unit),
        biases=reader.device_biases(unit),
        residual=residual,
        keep_float=recipe.float_output or keep_float or bool(excluded),
        formats={name: f for name, f in formats.items() if f != fmt},
        float_sites=frozenset(excluded),
        column_chunks=reader.head_chunks(unit) if head else None,
        inputs=inputs or {},
    )
    result = method(unit, data, fmt, recipe.method)
    plan, rounded_float = from_result(
        unit, result, weights=weights, formats=formats, dtypes=dtypes, excluded=excluded, float_output=recipe.float_output,
        seconds=(time.perf_counter() - t0) / max(len(unit.linears), 1), notes=notes, embedding=table,
        embedding_tied=embedding_ok and table is None,
        rotation_groups={name: reader.nodes[name].inputs[0] for name in result.online},
    )  # fmt: skip
    return Planned(plan, result.residual, rounded_float)


def _embedding_quantizable(unit: methods.Unit, fmt: QuantFormat, notes: list[str]) -> bool:
    emb, lin = unit.embedding, unit.linears[0]
    if emb is None:
        return False
    if lin.k % fmt.block_size:
        notes.append(f"embedding kept in float: hidden size {lin.k} is not a multiple of the block size {fmt.block_size}")
        return False
    return True
