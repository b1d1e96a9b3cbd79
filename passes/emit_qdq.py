"""Rounded linears as plain ONNX: DequantizeLinear(W_q, scales[, zero_points]) -> MatMul, which ORT
fuses back into MatMulNBits at load. Blocked DequantizeLinear needs opset 21 (25 for 2-bit types):
RaiseOpsetForQdq runs once, after every unit is applied."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.graph import opset, rewrite

from .context import EmitLinears, packed


class EmitQdq(EmitLinears):
    what = "DequantizeLinear -> MatMul"

    def emit(self, graph: ir.Graph, node: ir.Node, lin, q) -> None:
        base = f"{lin.weight.initializer}_DQ{q.fmt.bits}"
        values = {key: self.context.store.new(f"{base}_{key}", *spec) for key, spec in packed(q, lin).qdq_tensors().items()}
        rewrite.to_qdq(graph, node, lin, values, q.fmt)

    def replaced_by(self, name: str, q) -> str:
        return f"{name}_DQ"


class RaiseOpsetForQdq(ir.passes.InPlacePass):
    """The default opset that blocked DequantizeLinear of these container bits needs (ops converted)."""

    def __init__(self, container_bits: int):
        self.version = 25 if container_bits == 2 else 21

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.opset_imports.get("", 0)
        opset.raise_default_opset(model, self.version)
        return ir.passes.PassResult(model, modified=model.opset_imports.get("", 0) != before)

    def ensures(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < self.version:
            raise ir.passes.PostconditionError(f"default opset below {self.version}")
