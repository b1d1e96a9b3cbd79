"""Rounded linears as com.microsoft::MatMulNBits (ORT's CPU and CUDA kernels)."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.graph import rewrite

from .context import EmitLinears, packed


class EmitMatMulNBits(EmitLinears):
    what = "MatMulNBits"

    def emit(self, graph: ir.Graph, node: ir.Node, lin, q) -> None:
        tensors = packed(q, lin).matmulnbits_tensors()
        base = f"{lin.weight.initializer}_Q{q.fmt.bits}"
        values = {key: self.context.store.new(f"{base}_{key}", arr, dtype, arr.shape) for key, (arr, dtype) in tensors.items()}
        rewrite.to_matmulnbits(graph, node, lin, values, q.fmt, self.context.accuracy_level)

    def replaced_by(self, name: str, q) -> str:
        return f"{name}_Q{q.fmt.bits}"
