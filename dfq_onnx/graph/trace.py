"""Small read-only graph walks used by the structural matcher.

Activations are followed through ops that move, reshape, scale or mix values elementwise
(RoPE, norms, casts, GQA's repeat), and never through ops whose output is metadata
(Shape, Size) or through another matrix product: that is what lets one rule set match
the onnxruntime-genai builder, torch.onnx dynamo and TorchScript exports alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

ALL = None  # every input carries the traced value

# op_type -> indices of inputs through which an activation flows to the outputs.
PASS_THROUGH: dict[str, tuple[int, ...] | None] = {
    "Reshape": (0,),
    "Transpose": (0,),
    "Cast": (0,),
    "CastLike": (0,),
    "Identity": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Expand": (0,),
    "Tile": (0,),
    "Slice": (0,),
    "Split": (0,),
    "Flatten": (0,),
    "Concat": ALL,
    "Mul": ALL,
    "Add": ALL,
    "Sub": ALL,
    "Div": (0,),
    "Neg": (0,),
    "Where": (1, 2),
    "Pow": (0,),
    "Sqrt": (0,),
    "Reciprocal": (0,),
    "ReduceMean": (0,),
    "Tanh": (0,),
    "SimplifiedLayerNormalization": (0,),
    "SkipSimplifiedLayerNormalization": (0, 1),
    "LayerNormalization": (0,),
    "SkipLayerNormalization": (0, 1),
    "RMSNormalization": (0,),
    "RotaryEmbedding": (0,),
    "Dropout": (0,),
}

NORM_OPS = {
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SkipLayerNormalization",
    "RMSNormalization",
}

ACTIVATIONS = {
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Relu",
    "Silu",
    "Swish",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Mish",
    "Elu",
}


def is_constant(value: ir.Value | None) -> bool:
    """Initializer, Constant output, or computed only from constants (e.g. Transpose(initializer))."""
    if value is None:
        return True
    if value.const_value is not None or value.is_initializer():
        return True
    node = value.producer()
    if node is None:
        return False
    if node.op_type == "Constant":
        return True
    if node.op_type in ("Transpose", "Cast", "Identity", "Reshape", "Unsqueeze"):
        return is_constant(node.inputs[0])
    return False


def consumers(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    for use in value.uses():
        yield use.node, use.idx


def flows_through(node: ir.Node, index: int) -> bool:
    allowed = PASS_THROUGH.get(node.op_type, ())
    return allowed is ALL or index in allowed


def forward(
    start: ir.Value, is_stop: "callable[[ir.Node, int], bool]", limit: int = 400
) -> tuple[list[tuple[ir.Node, int]], list[ir.Node]]:
    """Follow `start` downstream; return the (node, input index) stops reached and the nodes passed.

    A consumer for which `is_stop` is true is recorded and not crossed; pass-through ops are
    crossed on their data inputs; anything else ends that branch silently.
    """
    stops: list[tuple[ir.Node, int]] = []
    passed: list[ir.Node] = []
    seen_values = {id(start)}
    seen_nodes: set[int] = set()
    queue = deque([start])
    while queue and len(passed) < limit:
        value = queue.popleft()
        for node, idx in consumers(value):
            if is_stop(node, idx):
                stops.append((node, idx))
                continue
            if not flows_through(node, idx) or id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            passed.append(node)
            for out in node.outputs:
                if id(out) not in seen_values:
                    seen_values.add(id(out))
                    queue.append(out)
    return stops, passed


def back_through(value: ir.Value, ops: Iterable[str]) -> ir.Value:
    """Walk upstream over single-data-input ops of the given types (e.g. Cast, Reshape)."""
    ops = set(ops)
    while True:
        node = value.producer()
        if node is None or node.op_type not in ops:
            return value
        value = node.inputs[0]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of a small constant input (initializer or Constant node), else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        node = value.producer()
        if node is not None and node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].value
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def partial_ints(value: ir.Value | None) -> list[int | None] | None:
    """Evaluate a shape-like int tensor where possible: unknown entries become None."""
    arr = const_array(value)
    if arr is not None:
        return [int(x) for x in arr.reshape(-1)]
    if value is None or value.producer() is None:
        return None
    node = value.producer()
    if node.op_type == "Concat":
        out: list[int | None] = []
        for part in node.inputs:
            vals = partial_ints(part)
            if vals is None:
                size = _static_len(part)
                if size is None:
                    return None
                vals = [None] * size
            out.extend(vals)
        return out
    if node.op_type in ("Unsqueeze", "Cast", "Identity"):
        vals = partial_ints(node.inputs[0])
        if vals is not None:
            return vals
    return [None] * n if (n := _static_len(value)) is not None else None


def _static_len(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None:
        return 1 if value.producer() is not None and value.producer().op_type in ("Gather",) else None
    if len(shape) == 0:
        return 1
    if len(shape) == 1 and isinstance(shape[0], int):
        return shape[0]
    return None


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def scalar_int(value: ir.Value | None, last_dims: dict[int, tuple[int, int | None]], depth: int = 12) -> int | None:
    """Evaluate a one-element int expression of constants and Shape(x)[-1] for values x whose last
    dimension is known (`last_dims`: id(value) -> (size, rank or None)): how TorchScript writes `chunk`
    and `rotate_half` bounds."""
    if value is None or depth == 0:
        return None
    arr = const_array(value)
    if arr is not None:
        return int(arr.reshape(-1)[0]) if arr.size == 1 else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].producer() is not None:
        shape = node.inputs[0].producer()
        index = const_array(node.inputs[1])
        if shape.op_type == "Shape" and index is not None and index.size == 1 and id(shape.inputs[0]) in last_dims:
            size, rank = last_dims[id(shape.inputs[0])]
            if shape.inputs[0].shape is not None:
                rank = len(shape.inputs[0].shape)
            i = int(index.reshape(-1)[0])
            if i == -1 or (rank is not None and i == rank - 1):
                return size
        return None
    if node.op_type in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Concat") and len([x for x in node.inputs if x is not None]) >= 1:
        return scalar_int(node.inputs[0], last_dims, depth - 1) if node.op_type != "Concat" or len(node.inputs) == 1 else None
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        a, b = (scalar_int(x, last_dims, depth - 1) for x in node.inputs[:2])
        if a is None or b is None or (node.op_type == "Div" and b == 0):
            return None
        return {"Add": a + b, "Sub": a - b, "Mul": a * b, "Div": a // b if b else 0}[node.op_type]
    return None
