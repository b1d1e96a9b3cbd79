"""Where passes put the tensors they make: appended to the output's external data file, wired into
the graph as initializers, and remembered (a tensor shared by many layers is written once).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import load, rewrite
from .save import ExternalDataWriter


class TensorStore:
    def __init__(self, graph: ir.Graph, writer: ExternalDataWriter):
        self.graph = graph
        self.writer = writer
        self.tensors: dict[str, ir.ExternalTensor] = {}  # every tensor written, by its name in the data file
        self.written: set[str] = set()  # initializers that already point into the data file

    def new(self, name: str, array: np.ndarray, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
        """Append a tensor and register it as a new initializer (renamed if the name is taken)."""
        self.tensors[name] = self.writer.write(name, array, dtype, shape)
        return self._register(name)

    def shared(self, name: str, array: np.ndarray) -> ir.Value:
        """A constant written once and read by every layer that uses it (online rotation blocks)."""
        if name not in self.tensors:
            self.tensors[name] = self.writer.write(name, array, rewrite.ir_dtype(array.dtype), array.shape)
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        return self._register(name)

    def _register(self, name: str) -> ir.Value:
        value = rewrite.new_initializer(self.graph, name, self.tensors[name])
        self.written.add(value.name)
        return value

    def view(self, name: str, of: ir.Value, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
        """A new initializer reading the very bytes of another one (no copy in the data file)."""
        src = of.const_value
        tensor = ir.ExternalTensor(src.location, src.offset, src.length, dtype, shape=ir.Shape(shape), name=name, base_dir=src.base_dir)
        value = rewrite.new_initializer(self.graph, name, tensor)
        self.written.add(value.name)
        return value

    def replace(self, initializer: str, array: np.ndarray) -> np.ndarray:
        """Write new values for an existing initializer, in its own dtype and shape; returns what was written."""
        old = self.graph.initializers[initializer].const_value
        arr = np.ascontiguousarray(array.astype(load.numpy_dtype(old.dtype)).reshape(tuple(old.shape.numpy())))
        tensor = self.writer.write(initializer, arr, old.dtype, arr.shape)
        self.tensors[initializer] = tensor
        rewrite.replace_initializer(self.graph, initializer, tensor)
        self.written.add(initializer)
        return arr
