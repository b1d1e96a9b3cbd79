"""What every pass that applies a plan shares: the sites it edits and the store it writes to."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from dfq_onnx.graph.rewrite import PackedWeight
from dfq_onnx.graph.sites import Linear, ModelSites
from dfq_onnx.graph.store import TensorStore
from dfq_onnx.plan import QuantizedWeight


@dataclasses.dataclass
class PlanContext:
    sites: ModelSites
    store: TensorStore
    accuracy_level: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)  # what the report should say of the edits


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.name: node for node in graph}


def packed(q: QuantizedWeight, lin: Linear) -> PackedWeight:
    return PackedWeight(fmt=q.fmt, k=lin.k, n=lin.n, codes=q.codes, scales=q.scales, zero_points=q.zero_points)


def require(condition: bool, message: str) -> None:
    """A pass's precondition: a plan that does not fit the graph stops before anything is edited."""
    if not condition:
        raise ir.passes.PreconditionError(message)


def linear_nodes(graph: ir.Graph, names, sites: ModelSites) -> dict[str, ir.Node]:
    """The float linears a plan names, each still a MatMul/Gemm of the graph."""
    nodes = nodes_by_name(graph)
    for name in names:
        require(name in sites.linears, f"{name}: not a linear of the model")
        require(name in nodes and nodes[name].op_type in ("MatMul", "Gemm"), f"{name}: no float MatMul/Gemm of that name is left")
    return {name: nodes[name] for name in names}


class EmitLinears(ir.passes.InPlacePass):
    """Base of the passes that replace planned float linears by their rounded forms: a subclass
    writes one linear's tensors and nodes (`emit`) and names the node that replaces it."""

    what = "its rounded form"

    def __init__(self, quantized: dict[str, QuantizedWeight], context: PlanContext):
        self.quantized, self.context = quantized, context

    def requires(self, model: ir.Model) -> None:
        linear_nodes(model.graph, self.quantized, self.context.sites)
        for name, q in self.quantized.items():
            lin = self.context.sites.linears[name]
            require((q.k, q.n) == (lin.k, lin.n), f"{name}: planned {q.k}x{q.n}, the linear is {lin.k}x{lin.n}")

    def emit(self, graph: ir.Graph, node: ir.Node, lin: Linear, q: QuantizedWeight) -> None:
        raise NotImplementedError

    def replaced_by(self, name: str, q: QuantizedWeight) -> str:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = linear_nodes(model.graph, self.quantized, self.context.sites)
        for name, q in self.quantized.items():
            self.emit(model.graph, nodes[name], self.context.sites.linears[name], q)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def ensures(self, model: ir.Model) -> None:
        names = {node.name for node in model.graph}
        for name, q in self.quantized.items():
            if name in names or self.replaced_by(name, q) not in names:
                raise ir.passes.PostconditionError(f"{name} was not replaced by {self.what}")
