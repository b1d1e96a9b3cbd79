"""The units of work: one per layer (its attention and MLP linears), the linears outside the
layers, and the head. Every run, estimate and worker walks the model in this order.
"""

from __future__ import annotations

import onnx_ir as ir

from ..config import Recipe
from ..graph.sites import ModelSites, Role
from ..methods import HEAD_LABEL, Unit


def layer_units(sites: ModelSites, graph: ir.Graph | None = None) -> list[Unit]:
    """One unit per layer (attention + MLP), then any remaining linears outside the layers."""
    units = []
    for layer in sites.layers():
        members = [lin for lin in sites.linears.values() if lin.layer == layer and lin.role != Role.LM_HEAD]
        att = next((a for a in sites.attentions if a.layer == layer), None)
        mlp = next((m for m in sites.mlps if m.layer == layer), None)
        foldable = {
            g.initializer
            for g in (att.input_norm if att else None, mlp.input_norm if mlp else None)
            if g is not None and g.exclusive and (graph is None or _only_used_by_its_norm(graph, g.initializer))
        }
        units.append(Unit(f"layer {layer}", layer, members, att, mlp, foldable))
    loose = [lin for lin in sites.linears.values() if lin.layer is None and lin.role == Role.OTHER]
    if loose:
        units.append(Unit("other linears", None, loose))
    return units


def head_unit(sites: ModelSites, recipe: Recipe) -> Unit | None:
    """The lm_head (and the embedding, quantized with it) when the recipe quantizes them."""
    if recipe.lm_head.bits is None or sites.lm_head is None or recipe.float_output:
        return None
    return Unit(HEAD_LABEL, None, [sites.linears[sites.lm_head]], embedding=sites.embedding, head_norm=sites.lm_head_norm)


def all_units(sites: ModelSites, graph: ir.Graph, recipe: Recipe) -> list[Unit]:
    """What a run quantizes, in order: the layers, the loose linears, then the head if the recipe rounds it."""
    units = layer_units(sites, graph)
    if (head := head_unit(sites, recipe)) is not None:
        units.append(head)
    return units


def _only_used_by_its_norm(graph: ir.Graph, name: str) -> bool:
    """A gain initializer shared with other nodes cannot be rewritten for one of them."""
    return len(graph.initializers[name].uses()) == 1
