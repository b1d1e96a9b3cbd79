"""The float tensors a plan changed, written over their initializers in the graph's own dtype,
shape and form: folded norm gains (stored as w where the graph computes 1 + w), biases moved with
their linear's output columns, and transformed float weights (float output)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dfq_onnx.graph.sites import ModelSites

from .context import PlanContext, require


def stored_gain(sites: ModelSites, name: str, gain: np.ndarray) -> np.ndarray:
    """A multiplicative gain in the form its initializer holds (w of 1 + w where the graph adds 1)."""
    norms = [a.input_norm for a in sites.attentions] + [m.input_norm for m in sites.mlps]
    plus_one = any(g is not None and g.initializer == name and g.plus_one for g in norms)
    values = gain.astype(np.float64)
    return values - 1.0 if plus_one else values


def stored_weight(sites: ModelSites, linear: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    """(initializer, array) of a float W[K, N] in its initializer's layout."""
    lin = sites.linears[linear]
    return lin.weight.initializer, (w.T if lin.weight.transposed else w)


def _require_sizes(model: ir.Model, arrays: dict[str, np.ndarray]) -> None:
    for name, arr in arrays.items():
        require(name in model.graph.initializers, f"{name}: no initializer of that name")
        old = model.graph.initializers[name].const_value
        require(old is not None and old.size == arr.size, f"{name}: planned {arr.size} values, the initializer has another size")


class FoldGains(ir.passes.InPlacePass):
    def __init__(self, gains: dict[str, np.ndarray], context: PlanContext):
        self.gains, self.context = gains, context

    def requires(self, model: ir.Model) -> None:
        _require_sizes(model, self.gains)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for name, gain in self.gains.items():
            self.context.store.replace(name, stored_gain(self.context.sites, name, gain))
        return ir.passes.PassResult(model, modified=bool(self.gains))


class MoveBiases(ir.passes.InPlacePass):
    def __init__(self, biases: dict[str, np.ndarray], context: PlanContext):
        self.biases, self.context = biases, context

    def _by_initializer(self) -> dict[str, np.ndarray]:
        return {self.context.sites.linears[name].bias: b for name, b in self.biases.items()}

    def requires(self, model: ir.Model) -> None:
        for name in self.biases:
            require(self.context.sites.linears.get(name) is not None and self.context.sites.linears[name].bias, f"{name}: has no bias")
        _require_sizes(model, self._by_initializer())

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for name, bias in self._by_initializer().items():
            self.context.store.replace(name, bias)
        return ir.passes.PassResult(model, modified=bool(self.biases))


class WriteFloatWeights(ir.passes.InPlacePass):
    def __init__(self, weights: dict[str, np.ndarray], context: PlanContext):
        self.weights, self.context = weights, context

    def _by_initializer(self) -> dict[str, np.ndarray]:
        return dict(stored_weight(self.context.sites, name, w) for name, w in self.weights.items())

    def requires(self, model: ir.Model) -> None:
        _require_sizes(model, self._by_initializer())

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for name, arr in self._by_initializer().items():
            self.context.store.replace(name, arr)
        return ir.passes.PassResult(model, modified=bool(self.weights))
