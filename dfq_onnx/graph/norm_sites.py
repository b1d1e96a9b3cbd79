"""The norm gains in front of linears (foldable when the normalised output feeds only them), the
post-norms on sublayer outputs, and the embedding's scale."""

from __future__ import annotations

import onnx_ir as ir

from . import trace
from .site_types import Linear, NormGain


def norm_gain(nodes: dict[str, ir.Node], linears: dict[str, Linear], members: list[str]) -> NormGain | None:
    if not members:
        return None
    shared = nodes[members[0]].inputs[0]
    if any(nodes[m].inputs[0] is not shared for m in members):
        return None
    value = trace.back_through(shared, ("Cast", "Identity"))
    node = value.producer()
    if node is None:
        return None
    k = linears[members[0]].k
    gain = None
    if node.op_type in trace.NORM_OPS and value is node.outputs[0]:
        index = 2 if node.op_type.startswith("Skip") else 1
        gain = _gain_initializer(node.inputs[index], k)
    elif node.op_type == "Mul":
        for index, x in enumerate(node.inputs):
            g = _gain_initializer(x, k)
            if g is not None and _has_rms_upstream(node.inputs[1 - index]):
                gain = g
                break
    if gain is None:
        return None
    init, plus_one = gain
    return NormGain(
        node=node.name,
        op_type=node.op_type,
        input_index=index,
        initializer=init,
        plus_one=plus_one,
        consumers=list(members),
        exclusive=_only_feeds(value, {id(nodes[m]) for m in members}),
    )


def output_norm(linear_node: ir.Node, n: int) -> NormGain | None:
    """An RMSNorm applied to a sublayer's output before it joins the residual stream (Gemma's post-norms).

    Followed downstream over the norm's own ops; a residual add (Add of two activations that are
    not both derived from this output, or a Skip*Normalization) ends the search.
    """
    start = linear_node.outputs[0]
    derived = {id(start)}
    frontier = [start]
    seen_reduce = False
    for _ in range(12):
        nxt = []
        for value in frontier:
            for node, idx in trace.consumers(value):
                if node.op_type in ("SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization") and idx == 0:
                    gain = _gain_initializer(node.inputs[1] if len(node.inputs) > 1 else None, n)
                    if gain:
                        return NormGain(node.name, node.op_type, 1, gain[0], gain[1], [], False)
                    return None
                if node.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "MatMul", "Gemm"):
                    continue
                if node.op_type == "Add" and all(not trace.is_constant(x) for x in node.inputs):
                    if not all(id(x) in derived for x in node.inputs):
                        continue  # the residual add: no norm before it
                if node.op_type == "ReduceMean":
                    seen_reduce = True
                if node.op_type == "Mul" and seen_reduce:
                    for i, x in enumerate(node.inputs):
                        gain = _gain_initializer(x, n)
                        if gain and id(node.inputs[1 - i]) in derived:
                            return NormGain(node.name, node.op_type, i, gain[0], gain[1], [], False)
                if node.op_type in ("Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div", "Mul"):
                    for out in node.outputs:
                        if id(out) not in derived:
                            derived.add(id(out))
                            nxt.append(out)
        frontier = nxt
    return None


def embedding_scale(gather: ir.Node) -> float:
    """Gemma multiplies embeddings by sqrt(hidden); other models by nothing."""
    value = gather.outputs[0]
    for _ in range(3):
        users = list(trace.consumers(value))
        if len(users) != 1:
            break
        node, _ = users[0]
        if node.op_type == "Cast":
            value = node.outputs[0]
            continue
        if node.op_type == "Mul":
            for x in node.inputs:
                arr = trace.const_array(x)
                if arr is not None and arr.size == 1:
                    return float(arr.reshape(-1)[0])
        break
    return 1.0


def _gain_initializer(value: ir.Value | None, k: int) -> tuple[str, bool] | None:
    if value is None:
        return None
    if value.is_initializer() and value.const_value is not None:
        shape = [int(d) for d in value.const_value.shape]
        if shape and shape[-1] == k and all(d == 1 for d in shape[:-1]):
            return value.name, False
        return None
    node = value.producer()
    if node is not None and node.op_type == "Add":
        ones = [trace.const_array(x) for x in node.inputs]
        for i, arr in enumerate(ones):
            if arr is not None and arr.size == 1 and float(arr.reshape(-1)[0]) == 1.0:
                inner = _gain_initializer(node.inputs[1 - i], k)
                if inner is not None:
                    return inner[0], True
    if node is not None and node.op_type == "Cast":
        return _gain_initializer(node.inputs[0], k)
    return None


def _has_rms_upstream(value: ir.Value | None, depth: int = 8) -> bool:
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            if v is None or v.producer() is None:
                continue
            node = v.producer()
            if node.op_type in ("ReduceMean",) or node.op_type in trace.NORM_OPS:
                return True
            nxt.extend(node.inputs)
        frontier = nxt
    return False


def _only_feeds(value: ir.Value, allowed: set[int]) -> bool:
    for node, _ in trace.consumers(value):
        if id(node) in allowed or node.op_type in ("Shape", "Size"):
            continue
        if node.op_type in ("Cast", "Identity") and _only_feeds(node.outputs[0], allowed):
            continue
        return False
    return True

