"""Graph surgery: replace a linear's float weight by its quantized form, clean up after it.

Two output forms for one quantized W[K, N]:
- MatMulNBits(A, B, scales[, zero_points]) from com.microsoft (ORT's CPU and CUDA kernels);
- DequantizeLinear(W_q[K, N], scales[K/bs, N][, zp], axis=0, block_size) -> MatMul, plain ONNX,
  which ORT fuses back into MatMulNBits when it loads the model.
The tensors arrive already written (external references); this module only wires them in.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from ..config import QuantFormat
from . import pack
from .sites import Linear

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class PackedWeight:
    """A quantized linear in the byte layouts of both output forms (numpy, ready to write)."""

    fmt: QuantFormat
    k: int
    n: int
    codes: np.ndarray  # uint8 [N, k_blocks, block_size] container codes
    scales: np.ndarray  # [N, k_blocks] in the activation dtype
    zero_points: np.ndarray | None  # uint8 [N, k_blocks]

    def matmulnbits_tensors(self) -> dict[str, tuple[np.ndarray, ir.DataType]]:
        bits = self.fmt.container_bits
        codes = self.codes
        if codes.shape[1] * codes.shape[2] != self.k:
            # Padding rows past K are never read; ORT's quantizer leaves them 0, and so do we.
            codes = codes.reshape(self.n, -1).copy()
            codes[:, self.k :] = 0
            codes = codes.reshape(self.codes.shape)
        out = {
            "B": (pack.matmulnbits_b(codes, bits), ir.DataType.UINT8),
            "scales": (np.ascontiguousarray(self.scales), ir_dtype(self.scales.dtype)),
        }
        if self.zero_points is not None:
            out["zero_points"] = (pack.matmulnbits_zero_points(self.zero_points, bits), ir.DataType.UINT8)
        return out

    def _qdq_codes(self, codes: np.ndarray) -> tuple[np.ndarray, ir.DataType]:
        """Signed values around zero when symmetric (no zero point input), else unsigned codes."""
        bits = self.fmt.container_bits
        if self.zero_points is None:
            values = codes.astype(np.int16) - (1 << (bits - 1))
            return _pack_flat(values, bits), {2: ir.DataType.INT2, 4: ir.DataType.INT4, 8: ir.DataType.INT8}[bits]
        return _pack_flat(codes, bits), {2: ir.DataType.UINT2, 4: ir.DataType.UINT4, 8: ir.DataType.UINT8}[bits]

    def _codes_rows(self) -> np.ndarray:
        return self.codes.reshape(self.n, -1)[:, : self.k]  # [N, K]

    def qdq_tensors(self) -> dict[str, tuple[np.ndarray, ir.DataType, tuple[int, ...]]]:
        """W_q[K, N] packed row-major (ONNX sub-byte layout), scales / zero points as [k_blocks, N]."""
        data, dtype = self._qdq_codes(self._codes_rows().T)
        kb = self.scales.shape[1]
        out = {
            "W": (data, dtype, (self.k, self.n)),
            "scales": (np.ascontiguousarray(self.scales.T), ir_dtype(self.scales.dtype), (kb, self.n)),
        }
        if self.zero_points is not None:
            zp, _ = self._qdq_codes(self.zero_points.T)
            out["zero_points"] = (zp, dtype, (kb, self.n))
        return out


def _pack_flat(values: np.ndarray, bits: int) -> np.ndarray:
    flat = (values.astype(np.int16) & ((1 << bits) - 1)).astype(np.uint8).reshape(-1)
    return pack.pack_along_last(flat, bits)


def ir_dtype(dtype: np.dtype) -> ir.DataType:
    return {np.dtype(np.float32): ir.DataType.FLOAT, np.dtype(np.float16): ir.DataType.FLOAT16}[np.dtype(dtype)]


def new_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    name = _unique_value_name(graph, name)
    tensor.name = name
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _unique_value_name(graph: ir.Graph, name: str) -> str:
    base, i = name, 1
    while name in graph.initializers:
        name = f"{base}_{i}"
        i += 1
    return name


def to_matmulnbits(
    graph: ir.Graph,
    node: ir.Node,
    lin: Linear,
    tensors: dict[str, ir.Value],
    fmt: QuantFormat,
    accuracy_level: int,
) -> ir.Node:
    """Replace MatMul/Gemm by MatMulNBits reading the given B / scales / zero points."""
    inputs = [node.inputs[0], tensors["B"], tensors["scales"]]
    if "zero_points" in tensors:
        inputs.append(tensors["zero_points"])
    attrs = [
        ir.AttrInt64("K", lin.k),
        ir.AttrInt64("N", lin.n),
        ir.AttrInt64("bits", fmt.container_bits),
        ir.AttrInt64("block_size", fmt.block_size),
    ]
    if accuracy_level:
        attrs.append(ir.AttrInt64("accuracy_level", accuracy_level))
    new = ir.Node(MS_DOMAIN, "MatMulNBits", inputs, attrs, num_outputs=1, name=f"{node.name}_Q{fmt.bits}")
    _replace(graph, node, [new], new.outputs[0], bias=_bias(node, lin))
    _ensure_opset(graph, MS_DOMAIN, 1)
    return new


def to_qdq(graph: ir.Graph, node: ir.Node, lin: Linear, tensors: dict[str, ir.Value], fmt: QuantFormat) -> ir.Node:
    """Feed the MatMul from DequantizeLinear(W_q, scales[, zero_points]) instead of the float weight."""
    dq_inputs = [tensors["W"], tensors["scales"]]
    if "zero_points" in tensors:
        dq_inputs.append(tensors["zero_points"])
    dq = ir.Node(
        "",
        "DequantizeLinear",
        dq_inputs,
        [ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", fmt.block_size)],
        num_outputs=1,
        name=f"{node.name}_DQ",
    )
    dq.outputs[0].name = f"{tensors['W'].name}_dq"
    matmul = ir.Node("", "MatMul", [node.inputs[0], dq.outputs[0]], num_outputs=1, name=f"{node.name}_Q{fmt.bits}")
    _replace(graph, node, [dq, matmul], matmul.outputs[0], bias=_bias(node, lin))
    return matmul


def _bias(node: ir.Node, lin: Linear) -> ir.Value | None:
    return node.inputs[2] if lin.bias and len(node.inputs) > 2 else None


def _replace(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], result: ir.Value, bias: ir.Value | None) -> None:
    if bias is not None:
        add = ir.Node("", "Add", [result, bias], num_outputs=1, name=f"{old.name}_bias")
        new_nodes = [*new_nodes, add]
        result = add.outputs[0]
    weight_input = old.inputs[1]
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, [old.outputs[0]], [result])
    drop_unused(graph, weight_input)


def drop_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer (and the Transpose / Cast chain in front of it) once nothing reads it."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if producer is None:
            if value.is_initializer():
                graph.initializers.pop(value.name, None)
            return
        if producer.op_type not in ("Transpose", "Cast", "Identity"):
            return
        upstream = producer.inputs[0]
        graph.remove(producer, safe=True)
        value = upstream


def _ensure_opset(graph: ir.Graph, domain: str, version: int) -> None:
    if graph.opset_imports.get(domain, 0) < version:
        graph.opset_imports[domain] = version


def replace_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> None:
    value = graph.initializers[name]
    tensor.name = name
    value.const_value = tensor


def gather_block_quantized(
    graph: ir.Graph,
    gather: ir.Node,
    data: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value | None,
    fmt: QuantFormat,
) -> ir.Node:
    """Embedding lookup on quantized rows (com.microsoft::GatherBlockQuantized, uint8-packed)."""
    inputs = [data, gather.inputs[1], scales]
    if zero_points is not None:
        inputs.append(zero_points)
    new = ir.Node(
        MS_DOMAIN,
        "GatherBlockQuantized",
        inputs,
        [
            ir.AttrInt64("gather_axis", 0),
            ir.AttrInt64("quantize_axis", 1),
            ir.AttrInt64("block_size", fmt.block_size),
            ir.AttrInt64("bits", fmt.container_bits),
        ],
        num_outputs=1,
        name=f"{gather.name}_Q{fmt.bits}",
    )
    old_table = gather.inputs[0]
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], [new], [gather.outputs[0]], [new.outputs[0]])
    drop_unused(graph, old_table)
    _ensure_opset(graph, MS_DOMAIN, 1)
    return new


def gather_unpacked(
    graph: ir.Graph,
    gather: ir.Node,
    data: ir.Value,
    scales: ir.Value,
    zero_points: ir.Value | None,
    fmt: QuantFormat,
    k: int,
    dtype: ir.DataType,
) -> ir.Node:
    """Plain-ONNX quantized embedding: gather packed rows, unpack nibbles, (q - z) * s per block.

    ONNX's Gather takes no 4-bit types, so rows stay uint8-packed (MatMulNBits' own row layout)
    and are unpacked with bit ops after the lookup; only the looked-up rows are dequantized.
    """
    ids = gather.inputs[1]
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs, **attrs) -> ir.Value:
        node = ir.Node("", op_type, inputs, [_attr(k, v) for k, v in attrs.items()], num_outputs=1,
                       name=f"{gather.name}_{op_type}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, array: np.ndarray) -> ir.Value:
        return new_initializer(graph, f"{gather.name}_{name}", ir.Tensor(array))

    bs, kb = fmt.block_size, k // fmt.block_size
    rows = op("Gather", [data, ids], axis=0)
    if fmt.container_bits == 4:
        last = const("last_axis", np.array([-1], dtype=np.int64))
        low = op("BitwiseAnd", [rows, const("low_mask", np.array(15, dtype=np.uint8))])
        high = op("BitShift", [rows, const("shift", np.array(4, dtype=np.uint8))], direction="RIGHT")
        rows = op("Concat", [op("Unsqueeze", [low, last]), op("Unsqueeze", [high, last])], axis=-1)
    codes = op("Cast", [op("Reshape", [rows, const("block_shape", np.array([0, 0, kb, bs], dtype=np.int64))])], to=dtype)
    if zero_points is None:
        mid = np.array(1 << (fmt.container_bits - 1), dtype=ir.DataType(dtype).numpy())
        zero = const("zero_point", mid)
    else:
        zero = op("Cast", [op("Unsqueeze", [op("Gather", [zero_points, ids], axis=0), const("zp_axis", np.array([-1], dtype=np.int64))])], to=dtype)
    scale = op("Unsqueeze", [op("Gather", [scales, ids], axis=0), const("scale_axis", np.array([-1], dtype=np.int64))])
    values = op("Mul", [op("Sub", [codes, zero]), scale])
    out = op("Reshape", [values, const("row_shape", np.array([0, 0, k], dtype=np.int64))])
    old_table = gather.inputs[0]
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], nodes, [gather.outputs[0]], [out])
    drop_unused(graph, old_table)
    return nodes[-1]


def insert_block_rotation(graph: ir.Graph, consumers: list[ir.Node], block: ir.Value) -> list[ir.Node]:
    """Feed the consumers of one activation x[..., K] with x blockdiag(T, T, ...) instead of x.

    Shape(x) -> Reshape(x, [-1, b]) -> MatMul(T[b, b]) -> Reshape(shape): one rotation of any rank,
    computed once and shared by every consumer (e.g. gate and up); other readers of x keep x.
    Distinct blocks T[K/b, b, b] take Reshape(x, [-1, K/b, 1, b]) and a broadcasting MatMul.
    """
    x = consumers[0].inputs[0]
    if any(c.inputs[0] is not x for c in consumers):
        raise ValueError("an online rotation is shared only by consumers of the same activation")
    b = block.shape[-1]
    first = next(node for node in graph if any(node is c for c in consumers))
    base = f"{first.name}_online"
    if len(block.shape) == 3:
        n = block.shape[0]
        rows = _shared_constant(graph, f"online_rows_{n}x{b}", np.array([-1, n, 1, b], dtype=np.int64))
    else:
        rows = _shared_constant(graph, f"online_rows_{b}", np.array([-1, b], dtype=np.int64))
    shape = ir.Node("", "Shape", [x], num_outputs=1, name=f"{base}_shape")
    flat = ir.Node("", "Reshape", [x, rows], num_outputs=1, name=f"{base}_flat")
    turn = ir.Node("", "MatMul", [flat.outputs[0], block], num_outputs=1, name=f"{base}_rotate")
    back = ir.Node("", "Reshape", [turn.outputs[0], shape.outputs[0]], num_outputs=1, name=f"{base}_out")
    back.outputs[0].name = f"{base}_x"
    if x.dtype is not None:  # TorchScript exports carry no types on intermediate values
        back.outputs[0].dtype = x.dtype
        back.outputs[0].shape = x.shape
    nodes = [shape, flat, turn, back]
    graph.insert_before(first, nodes)
    for consumer in consumers:
        consumer.replace_input_with(0, back.outputs[0])
    return nodes


def _shared_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    return new_initializer(graph, name, ir.Tensor(array))


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, str):
        return ir.AttrString(name, value)
    return ir.AttrInt64(name, int(value))
