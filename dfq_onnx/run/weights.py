"""The graph's float tensors as torch tensors: the one reader of weights, gains, biases and the
embedding that the method, the prior, the size budget and Ray's workers share. Only reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import torch

from ..errors import DfqError
from ..graph import load
from ..graph.sites import Linear, ModelSites

if TYPE_CHECKING:
    from ..methods import Unit


class LazyWeights(Mapping):
    """A unit's weights, each read when first used and then kept: the MLP's are not resident while the
    attention is rounded (on the 2B shape that is a quarter of a layer's peak memory)."""

    def __init__(self, names, read: Callable[[str], torch.Tensor], held: dict[str, torch.Tensor] | None = None):
        self._held = dict(held or {})
        self._names = [*names, *(name for name in self._held if name not in names)]
        self._read = read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._held:
            if name not in self._names:
                raise KeyError(name)
            self._held[name] = self._read(name)
        return self._held[name]

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class WeightReader:
    def __init__(self, graph: ir.Graph, sites: ModelSites, device: str):
        self.graph, self.sites, self.device = graph, sites, device
        self.nodes = {node.name: node for node in graph}

    def weight(self, lin: Linear, as_stored: bool = False) -> torch.Tensor:
        """W[K, N], float32 and contiguous; with `as_stored`, W as it is stored: its own float dtype,
        and a weight stored [N, K] as a transposed view (round-to-nearest reads it piece by piece)."""
        arr = load.read_array(self.graph.initializers[lin.weight.initializer].const_value)
        load.check_array_finite(arr, lin.weight.initializer)
        if as_stored:
            w = stored_tensor(arr)
            return w.t() if lin.weight.transposed else w
        w = torch.from_numpy(arr.astype(np.float32, copy=False))
        return w.t().contiguous() if lin.weight.transposed else w

    def column_chunks(self, initializer: str, stored_transposed: bool, columns: int):
        """W[K, N] (the initializer, or its transpose when `stored_transposed`) as float32 [K, <= columns]
        pieces read from storage one at a time, rows of W^T in stored order: never whole in float32."""
        tensor = self.graph.initializers[initializer].const_value
        for rows in load.iter_rows(tensor, transposed=not stored_transposed, rows_per_block=columns):
            load.check_array_finite(rows, initializer)
            yield torch.from_numpy(rows).t().contiguous().to(self.device)

    def head_chunks(self, unit: Unit):
        """The head unit's reader of column pieces: the lm_head's W, or the untied embedding table as
        W[hidden, vocab] (stored [vocab, hidden] unless `transposed`)."""
        linears = {lin.node: lin for lin in unit.linears}

        def read(name: str, columns: int):
            if name in linears:
                return self.column_chunks(linears[name].weight.initializer, linears[name].weight.transposed, columns)
            return self.column_chunks(unit.embedding.initializer, not unit.embedding.transposed, columns)

        return read

    def embedding_table(self, unit: Unit) -> torch.Tensor:
        """The untied embedding table as W[hidden, vocab]: it is rounded like the lm_head."""
        emb = unit.embedding
        arr = load.read_array(self.graph.initializers[emb.initializer].const_value)
        e = torch.from_numpy(arr.astype(np.float32, copy=False))
        return e if emb.transposed else e.t().contiguous()

    def embedding_rows(self, rows_per_block: int = 1024):
        """The embedding table's rows [vocab, hidden] in float32 pieces, as stored."""
        emb = self.sites.embedding
        return load.iter_rows(self.graph.initializers[emb.initializer].const_value, emb.transposed, rows_per_block=rows_per_block)

    def activation_dtype(self, lin: Linear) -> np.dtype:
        node = self.nodes[lin.node]
        dtype = node.outputs[0].dtype or node.inputs[0].dtype
        if dtype == ir.DataType.FLOAT16:
            return np.dtype(np.float16)
        if dtype in (None, ir.DataType.FLOAT):
            return np.dtype(np.float16) if lin.weight.dtype == "FLOAT16" else np.dtype(np.float32)
        raise DfqError(f"{lin.node}: activations of type {dtype.name} are not supported; use fp32 or fp16")

    def scale_bits(self, lin: Linear) -> int:
        """Bits of each block scale: scales are stored in the activation dtype."""
        return 16 if self.activation_dtype(lin).itemsize == 2 else 32

    def bias(self, lin: Linear) -> torch.Tensor | None:
        """The linear's output bias when it is an initializer we may rewrite (read by that Add alone)."""
        if lin.bias is None or lin.bias not in self.graph.initializers or len(self.graph.initializers[lin.bias].uses()) != 1:
            return None
        arr = load.read_array(self.graph.initializers[lin.bias].const_value).astype(np.float32).reshape(-1)
        return torch.from_numpy(arr)

    def gains(self, unit: Unit) -> dict[str, torch.Tensor]:
        """Multiplicative norm gains in front of the unit's linears (1 + w where the graph adds the 1)."""
        out = {}
        norms = []
        if unit.attention:
            norms += [unit.attention.input_norm, unit.attention.output_norm]
        if unit.mlp:
            norms += [unit.mlp.input_norm, unit.mlp.output_norm]
        norms.append(unit.head_norm)
        for norm in norms:
            if norm is not None:
                out[norm.initializer] = self.norm_gain(norm)
        return out

    def norm_gain(self, norm) -> torch.Tensor:
        arr = load.read_array(self.graph.initializers[norm.initializer].const_value).astype(np.float32).reshape(-1)
        return torch.from_numpy(arr + 1.0 if norm.plus_one else arr)

    def device_gains(self, unit: Unit) -> dict[str, torch.Tensor]:
        return {name: g.to(self.device) for name, g in self.gains(unit).items()}

    def device_biases(self, unit: Unit) -> dict[str, torch.Tensor]:
        return {lin.node: b.to(self.device) for lin in unit.linears if (b := self.bias(lin)) is not None}


def stored_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a stored array; bfloat16, which numpy lacks, through its bits."""
    if arr.dtype == load.numpy_dtype(ir.DataType.BFLOAT16):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
