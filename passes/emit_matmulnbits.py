"""Rounded linears as com.microsoft::MatMulNBits (ORT's CPU and CUDA kernels)."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.graph import rewrite

from .context import EmitLinears, linear_nodes, packed


class EmitMatMulNBits(EmitLinears):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, store = model.graph, self.context.store
        nodes = linear_nodes(graph, self.quantized, self.context.sites)
        for name, q in self.quantized.items():
            lin = self.context.sites.linears[name]
            base = lin.weight.initializer
            tensors = packed(q, lin).matmulnbits_tensors()
            values = {key: store.new(f"{base}_Q{q.fmt.bits}_{key}", arr, dtype, arr.shape) for key, (arr, dtype) in tensors.items()}
            rewrite.to_matmulnbits(graph, nodes[name], lin, values, q.fmt, self.context.accuracy_level)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def ensures(self, model: ir.Model) -> None:
        names = {node.name for node in model.graph}
        for name, q in self.quantized.items():
            if name in names or f"{name}_Q{q.fmt.bits}" not in names:
                raise ir.passes.PostconditionError(f"{name} was not replaced by its MatMulNBits")
