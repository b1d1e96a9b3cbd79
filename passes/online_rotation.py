"""Online block transforms: x' = x blockdiag(T) computed in front of the linears whose rows took T^-1.

One rotation per activation, shared by every linear of the unit that reads it (gate and up); the
b x b block is written once to the data file and read by every layer that uses the same block."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

from dfq_onnx.graph import rewrite
from dfq_onnx.plan import OnlineRotation

from .context import PlanContext, linear_nodes, require


def rotation_name(block: np.ndarray) -> str:
    digest = hashlib.sha1(block.tobytes()).hexdigest()[:8]
    kind = "" if block.ndim == 2 else "s"  # [K/b, b, b]: one learned block per b channels
    return f"online_rotation{block.shape[-1]}{kind}_{block.dtype.name}_{digest}"


class InsertOnlineRotations(ir.passes.InPlacePass):
    def __init__(self, rotations: list[OnlineRotation], context: PlanContext):
        self.rotations, self.context = rotations, context

    def requires(self, model: ir.Model) -> None:
        for r in self.rotations:
            nodes = linear_nodes(model.graph, r.linears, self.context.sites)
            b = r.block.shape[-1]
            shape_ok = r.block.shape in ((b, b), (r.k // b, b, b))
            require(shape_ok and r.k % b == 0, f"{r.linears[0]}: a {r.block.shape} block cannot rotate K = {r.k}")
            first = nodes[r.linears[0]].inputs[0]
            require(all(n.inputs[0] is first for n in nodes.values()), f"{r.linears}: do not read one activation")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for r in self.rotations:
            nodes = linear_nodes(model.graph, r.linears, self.context.sites)
            value = self.context.store.shared(rotation_name(r.block), r.block)
            rewrite.insert_block_rotation(model.graph, [nodes[n] for n in r.linears], value)
        return ir.passes.PassResult(model, modified=bool(self.rotations))
