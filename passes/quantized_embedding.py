"""The embedding lookup on rounded rows. With MatMulNBits output: com.microsoft::GatherBlockQuantized,
reading the very bytes of the lm_head's B and scales when the two are tied. With QDQ output (plain
ONNX): gather the packed rows, unpack, (q - z) * s per block (a second copy when tied)."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.graph import pack, rewrite
from dfq_onnx.graph.sites import Embedding
from dfq_onnx.plan import QuantizedWeight

from .context import PlanContext, nodes_by_name, packed, require


class _Embedding(ir.passes.InPlacePass):
    def __init__(self, q: QuantizedWeight, tied: bool, context: PlanContext):
        self.q, self.tied, self.context = q, tied, context
        self.emb: Embedding = context.sites.embedding
        self.head = context.sites.linears[context.sites.lm_head]
        self.base = f"{self.emb.initializer}_embedding"

    def requires(self, model: ir.Model) -> None:
        require(self.emb is not None, "the model has no embedding to quantize")
        require(self.emb.node in nodes_by_name(model.graph), f"{self.emb.node}: the embedding Gather is gone")
        require((self.q.k, self.q.n) == (self.head.k, self.head.n), "the planned embedding does not match the lm_head's shape")

    def _rows(self) -> tuple[int, int]:
        return self.head.n, self.head.k * self.q.fmt.container_bits // 8

    def _packed_rows(self, store) -> ir.Value:
        shape = self._rows()
        arr = pack.matmulnbits_b(self.q.codes, self.q.fmt.container_bits).reshape(shape)
        return store.new(f"{self.base}_data", arr, ir.DataType.UINT8, shape)


class GatherBlockQuantizedEmbedding(_Embedding):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, store, fmt = model.graph, self.context.store, self.q.fmt
        nodes = nodes_by_name(graph)
        weights = packed(self.q, self.head)
        if self.tied:  # the lm_head's MatMulNBits inputs: A, B, scales[, zero_points]
            inputs = nodes[f"{self.head.node}_Q{fmt.bits}"].inputs
            data = store.view(f"{self.base}_data", inputs[1], ir.DataType.UINT8, self._rows())
            scales, zps = inputs[2], (inputs[3] if len(inputs) > 3 else None)
        else:
            data = self._packed_rows(store)
            scales = store.new(f"{self.base}_scales", weights.scales, rewrite.ir_dtype(weights.scales.dtype), weights.scales.shape)
            zps = None
            if weights.zero_points is not None:
                zp = pack.matmulnbits_zero_points(weights.zero_points, fmt.container_bits)
                zps = store.new(f"{self.base}_zp", zp, ir.DataType.UINT8, zp.shape)
        rewrite.gather_block_quantized(graph, nodes[self.emb.node], data, scales, zps, fmt)
        return ir.passes.PassResult(model, modified=True)


class UnpackedEmbedding(_Embedding):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, store, fmt = model.graph, self.context.store, self.q.fmt
        weights = packed(self.q, self.head)
        data = self._packed_rows(store)
        irtype = rewrite.ir_dtype(weights.scales.dtype)
        scales = store.new(f"{self.base}_scales", weights.scales, irtype, weights.scales.shape)
        zps = None
        if weights.zero_points is not None:
            zps = store.new(f"{self.base}_zp", weights.zero_points, ir.DataType.UINT8, weights.zero_points.shape)
        rewrite.gather_unpacked(graph, nodes_by_name(graph)[self.emb.node], data, scales, zps, fmt, self.head.k, irtype)
        if self.tied:
            self.context.notes.append("QDQ output stores the tied embedding and lm_head as two quantized copies")
        return ir.passes.PassResult(model, modified=True)
