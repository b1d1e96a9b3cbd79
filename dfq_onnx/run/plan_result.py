"""A method's result for one unit (torch tensors) as a UnitPlan (plain numpy arrays): the rounded
weights in the activation dtype, the float weights the output keeps, the rotations grouped by the
activation they turn, and the report's line for every linear.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .. import fast_path, methods
from ..config import QuantFormat
from ..graph.sites import Linear
from ..plan import OnlineRotation, QuantizedWeight, UnitPlan
from ..quant import grid, proxy
from ..report import SiteResult


def from_result(
    unit: methods.Unit, result: methods.UnitResult, *, weights: Mapping[str, torch.Tensor], formats: dict[str, QuantFormat],
    dtypes: dict[str, np.dtype], excluded: set[str], float_output: bool, seconds: float, notes: list[str],
    embedding: str | None, embedding_tied: bool, rotation_groups: Mapping[str, object],
) -> tuple[UnitPlan, dict[str, np.ndarray]]:  # fmt: skip
    """The plan, and linear -> the float W[K, N] that was rounded (for the exactness check).
    `embedding`: the untied table's name when it was rounded with the head; `rotation_groups`:
    linear -> the activation its input reads (linears of one activation share a rotation)."""
    plan = UnitPlan(label=unit.label, notes=notes + result.notes)
    rounded_float = {}
    for lin in unit.linears:
        q = result.quantized[lin.node]
        float_weight = result.float_weights.get(lin.node)
        if lin.node in excluded:  # kept in float: the transformed weight, so the layer computes what it did
            plan.sites.append(_float_site(lin, seconds, result.transforms.get(lin.node, [])))
            plan.float_weights[lin.node] = _numpy(weights[lin.node] if float_weight is None else float_weight)
            continue
        errors = result.errors.get(lin.node)  # the weight is read again only where the method gave no errors
        plan.sites.append(
            _site_result(lin, weights[lin.node] if errors is None else None, q, formats[lin.node], seconds,
                         result.transforms.get(lin.node, []), errors, dtypes[lin.node])
        )  # fmt: skip
        if float_output:
            plan.float_weights[lin.node] = _numpy(weights[lin.node] if float_weight is None else float_weight)
        else:
            plan.quantized[lin.node] = _quantized(q, dtypes[lin.node])
            if float_weight is not None:
                rounded_float[lin.node] = _numpy(float_weight)
    if embedding is not None:
        plan.embedding = _quantized(result.quantized[embedding], dtypes[unit.linears[0].node])
    elif embedding_tied:  # the lm_head's rounded weight is the table
        plan.embedding, plan.embedding_tied = plan.quantized[unit.linears[0].node], True
    plan.gains = {name: _numpy(g) for name, g in result.changed.items()}
    plan.biases = {name: _numpy(b) for name, b in result.biases.items()}
    plan.online = _online(result.online, dtypes, rotation_groups, {lin.node: lin for lin in unit.linears})
    return plan, rounded_float


def _online(online: dict[str, torch.Tensor], dtypes: dict[str, np.dtype], activation_of: Mapping[str, object], linears: Mapping[str, Linear]) -> list[OnlineRotation]:
    """One rotation per activation, shared by the linears of the unit that read it."""
    groups: dict[int, list[str]] = {}
    for name in online:
        groups.setdefault(id(activation_of[name]), []).append(name)
    out = []
    for names in groups.values():
        lin = linears[names[0]]
        block = online[names[0]].detach().cpu().numpy().astype(dtypes[names[0]])
        out.append(OnlineRotation(names, block, lin.k, lin.layer))
    return out


def _site_result(lin, w, q: grid.Quantized, fmt, seconds, transforms, errors, dtype: np.dtype) -> SiteResult:
    if errors is not None:
        ref, err, rtn_err = errors.reference, errors.error, errors.rtn_error
    else:
        ref, err = proxy.quantized_errors(w, q)
        rtn_err = err
    return SiteResult(
        name=lin.node,
        role=lin.role.value,
        layer=lin.layer,
        k=lin.k,
        n=lin.n,
        bits=fmt.bits,
        container_bits=fmt.container_bits,
        block_size=fmt.block_size,
        symmetric=fmt.symmetric,
        scale_bits=16 if dtype == np.float16 else 32,
        rel_error=err / ref if ref else 0.0,
        rtn_rel_error=rtn_err / ref if ref else 0.0,
        seconds=seconds,
        transforms=list(transforms),
        cuda_gemm_misses=fast_path.cuda_gemm_misses(fmt, lin.k, lin.n, dtype == np.float16),
    )


def _float_site(lin: Linear, seconds: float, transforms: list[str]) -> SiteResult:
    """A linear the recipe keeps in float (`exclude`): its weight's own bits, no error."""
    bits = 16 if lin.weight.dtype == "FLOAT16" else 32
    return SiteResult(
        name=lin.node, role=lin.role.value, layer=lin.layer, k=lin.k, n=lin.n, bits=bits, container_bits=bits,
        block_size=lin.k, symmetric=True, scale_bits=0, rel_error=0.0, rtn_rel_error=0.0, seconds=seconds,
        transforms=[*transforms, "excluded"],
    )  # fmt: skip


def _quantized(q: grid.Quantized, dtype: np.dtype) -> QuantizedWeight:
    return QuantizedWeight(
        codes=q.codes.cpu().numpy(),
        scales=q.scales.cpu().numpy().astype(dtype),
        zero_points=None if q.zero_points is None else q.zero_points.cpu().numpy(),
        k=q.k,
        fmt=q.fmt,
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
