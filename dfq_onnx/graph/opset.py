"""Raising a model's default opset so blocked DequantizeLinear is allowed (21; 25 for int2).

Only the changes that occur in LLM exports between opset 13 and 25 need work: the Reduce*
ops (other than ReduceSum) took `axes` as an attribute until 17 and as an input from 18.
Every other op those exports use kept its meaning.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import DfqError

MIN_SOURCE_OPSET = 13
AXES_TO_INPUT_AT_18 = {
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
}
IR_VERSION_FOR_OPSET = {21: 10, 22: 10, 23: 11, 24: 11, 25: 13}


def raise_default_opset(model: ir.Model, target: int) -> None:
    current = model.opset_imports.get("", 0)
    if current >= target:
        _raise_ir_version(model, current)
        return
    if current < MIN_SOURCE_OPSET:
        raise DfqError(
            f"QDQ output needs opset {target} and this model is opset {current} (< {MIN_SOURCE_OPSET}); "
            "re-export it with a newer opset or use --format matmulnbits"
        )
    if current < 18:
        for node in model.graph.all_nodes():
            if node.domain in ("", "ai.onnx") and node.op_type in AXES_TO_INPUT_AT_18:
                _axes_attribute_to_input(model.graph, node)
    model.opset_imports[""] = target
    _raise_ir_version(model, target)


def _axes_attribute_to_input(graph: ir.Graph, node: ir.Node) -> None:
    axes = node.attributes.pop("axes", None)
    if axes is None:
        return
    name = f"{node.name}_axes"
    tensor = ir.Tensor(np.asarray(list(axes.value), dtype=np.int64), name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(ir.DataType.INT64), const_value=tensor)
    graph.register_initializer(value)
    node.resize_inputs(2)
    node.replace_input_with(1, value)


def _raise_ir_version(model: ir.Model, opset: int) -> None:
    need = max(v for o, v in IR_VERSION_FOR_OPSET.items() if o <= max(opset, 21))
    if model.ir_version < need:
        model.ir_version = need
