"""A session whose lm_head runs at chosen positions only: an evaluation copy of the graph, in memory.

The head of a small LLM is most of its cost per token (Gemma 3 270M: 168M of 268M multiply-adds, a
262k-row matrix), and an evaluation needs logits only where it scores: the last position when
sampling, the continuation when scoring a task. The copy gathers the head's input rows named by a
new graph input, POSITIONS (int64 indices into the flattened [batch * sequence] rows), so its
logits are [1, len(POSITIONS), vocab]. The input's files are read, never written: the copy is
serialised in memory and ONNX Runtime reads the external data from the model's own folder.
"""

from __future__ import annotations

from pathlib import Path

from ..run import verify

POSITIONS = "dfq_eval_positions"
# Nodes between the head's matrix product and the logits that act on each row alone (casts,
# Gemma 2's soft-capping, a bias): the rows can be gathered before them.
ROW_WISE = {"Cast", "Div", "Mul", "Tanh", "Add", "Sub", "Softcap", "Identity"}
HEADS = {"MatMul", "MatMulNBits", "Gemm", "FusedMatMul"}


def logits_name(graph) -> str:
    return verify.pick_logits([o.name for o in graph.output])


def head_node(graph, lm_head: str | None = None):
    """The node whose matrix product makes the logits: `lm_head` when the caller knows it, else the
    first matrix product met walking back from the logits through row-wise nodes; None if none."""
    by_output = {out: node for node in graph.node for out in node.output}
    if lm_head:
        found = next((n for n in graph.node if n.name == lm_head), None)
        if found is not None:
            return found
    node = by_output.get(logits_name(graph))
    while node is not None and node.op_type not in HEADS:
        if node.op_type not in ROW_WISE:
            return None
        node = by_output.get(node.input[0])
    return node


def session_bytes(path: Path, lm_head: str | None = None) -> bytes | None:
    """The serialised evaluation copy of `path`, or None when its head cannot be found (the caller
    then computes logits everywhere)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    head = head_node(graph, lm_head)
    if head is None:
        return None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    x = head.input[0]
    flat, rows, picked = (f"{POSITIONS}/{what}" for what in ("flat", "rows", "picked"))
    axes = f"{POSITIONS}/axes"
    nodes = [
        helper.make_node("Flatten", [x], [flat], name=f"{POSITIONS}/Flatten", axis=-1),
        helper.make_node("Gather", [flat, POSITIONS], [rows], name=f"{POSITIONS}/Gather", axis=0),
    ]
    if opset >= 13:
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), axes))
        nodes.append(helper.make_node("Unsqueeze", [rows, axes], [picked], name=f"{POSITIONS}/Unsqueeze"))
    else:
        nodes.append(helper.make_node("Unsqueeze", [rows], [picked], name=f"{POSITIONS}/Unsqueeze", axes=[0]))
    at = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    head.input[0] = picked
    graph.input.append(helper.make_tensor_value_info(POSITIONS, onnx.TensorProto.INT64, ["positions"]))
    # The logits (and values between the head and them) are [1, positions, vocab] now: drop shapes
    # that say otherwise.
    changed = _downstream(graph, head)
    for info in list(graph.value_info):
        if info.name in changed:
            graph.value_info.remove(info)
    for out in graph.output:
        if out.name in changed:
            out.type.tensor_type.ClearField("shape")
    return model.SerializeToString()


def _downstream(graph, head) -> set[str]:
    names = set(head.output)
    for node in graph.node:
        if names.intersection(node.input):
            names.update(node.output)
    return names
