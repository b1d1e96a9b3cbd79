"""Float copies of the output, built beside it for verification only (never published).

A mirror is the input model with the run's float edits applied as they happen: folded gains,
moved biases, inserted online rotations, and each quantized linear's weight replaced by a float
array. With the transformed float weights it is the *exact* mirror (it must compute the input's
function); with the dequantized weights it is the *dequantized* mirror (the written model must
compute what it does). Comparing the three in ONNX Runtime catches a transform that changes the
function and a packing or rewrite that does not store what the method computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..graph import load, rewrite, save
from ..graph.sites import Linear, ModelSites, name_nodes
from ..methods import HEAD_LABEL
from ..passes.float_edits import stored_gain
from ..plan import UnitPlan


class Mirror:
    def __init__(self, input_path: Path, work: Path, name: str):
        self.model = load.load_model(input_path)
        name_nodes(self.model.graph)  # the same names the matcher gave the output's graph
        self.graph = self.model.graph
        self.nodes = {node.name: node for node in self.graph}
        self.path = work / f"{name}.onnx"
        self.writer = save.ExternalDataWriter(work, f"{name}.onnx.data")
        self.written: set[str] = set()

    def _put(self, initializer: str, array: np.ndarray) -> None:
        old = self.graph.initializers[initializer].const_value
        arr = np.ascontiguousarray(array.astype(load.numpy_dtype(old.dtype)).reshape(tuple(old.shape.numpy())))
        rewrite.replace_initializer(self.graph, initializer, self.writer.write(initializer, arr, old.dtype, arr.shape))
        self.written.add(initializer)

    def set_weight(self, lin: Linear, w: np.ndarray) -> None:
        """W[K, N] in float, stored in the initializer's own layout and dtype."""
        self._put(lin.weight.initializer, w.T if lin.weight.transposed else w)

    def replace(self, initializer: str, array: np.ndarray) -> None:
        self._put(initializer, array)

    def rotate(self, linears: list[str], block: np.ndarray) -> None:
        name = f"online_rotation{block.shape[-1]}"
        tensor = self.writer.write(name, block, rewrite.ir_dtype(block.dtype), block.shape)
        value = rewrite.new_initializer(self.graph, name, tensor)
        self.written.add(value.name)
        rewrite.insert_block_rotation(self.graph, [self.nodes[n] for n in linears], value)

    def finish(self) -> Path:
        save.externalize_remaining(self.model, self.writer, keep_names=self.written)
        self.writer.close()
        save.save_model(self.model, self.path)
        return self.path

    def close(self) -> None:
        self.writer.close()


def follow(mirrors: dict[str, Mirror], plan: UnitPlan, sites: ModelSites, rounded: dict[str, np.ndarray]) -> list[str]:
    """Give the verification copies a unit's edits (the rounded float weights go to the exact one,
    the dequantized ones to the other); returns what the report should say. May drop the
    dequantized copy when the plan leaves it nothing to be compared with."""
    notes = []
    for r in plan.online:
        for mirror in mirrors.values():
            mirror.rotate(r.linears, r.block)
    for name, q in plan.quantized.items():
        if "exact" in mirrors and name in rounded:
            mirrors["exact"].set_weight(sites.linears[name], rounded[name])
        if "dequantized" in mirrors:
            mirrors["dequantized"].set_weight(sites.linears[name], q.dequantize())
    for name, w in plan.float_weights.items():  # linears kept in float (excluded)
        for mirror in mirrors.values():
            mirror.set_weight(sites.linears[name], w)
    for mirror in mirrors.values():
        for name, gain in plan.gains.items():
            mirror.replace(name, stored_gain(sites, name, gain))
        for name, bias in plan.biases.items():
            mirror.replace(sites.linears[name].bias, bias)
    emb = sites.embedding
    if "dequantized" in mirrors and emb is not None and plan.label == HEAD_LABEL:
        if plan.embedding is None and emb.tied:  # its copy shares the lm_head's now-dequantized table
            mirrors.pop("dequantized").close()
            notes.append("fidelity not checked: the tied embedding stays float while its lm_head is quantized")
        elif plan.embedding is not None and not plan.embedding_tied:
            table = plan.embedding.dequantize()  # [hidden, vocab]
            mirrors["dequantized"].replace(emb.initializer, table if emb.transposed else table.T)
    return notes

