"""Rounded linears as plain ONNX: DequantizeLinear(W_q, scales[, zero_points]) -> MatMul, which ORT
fuses back into MatMulNBits at load. Blocked DequantizeLinear needs opset 21 (25 for 2-bit types):
RaiseOpsetForQdq runs once, after every unit is applied."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.graph import opset, rewrite

from .context import EmitLinears, linear_nodes, packed


class EmitQdq(EmitLinears):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, store = model.graph, self.context.store
        nodes = linear_nodes(graph, self.quantized, self.context.sites)
        for name, q in self.quantized.items():
            lin = self.context.sites.linears[name]
            base = lin.weight.initializer
            values = {key: store.new(f"{base}_DQ{q.fmt.bits}_{key}", *spec) for key, spec in packed(q, lin).qdq_tensors().items()}
            rewrite.to_qdq(graph, nodes[name], lin, values, q.fmt)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def ensures(self, model: ir.Model) -> None:
        names = {node.name for node in model.graph}
        for name, q in self.quantized.items():
            if name in names or f"{name}_DQ" not in names:
                raise ir.passes.PostconditionError(f"{name} was not replaced by DequantizeLinear -> MatMul")


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
