"""Structural matching: which MatMul is q, k, v, o, gate, up, down, lm_head, and what pairs them.

Roles are found by who feeds whom, never by names, so the same rules read exports of the
onnxruntime-genai builder (fused qkv + GroupQueryAttention), torch.onnx dynamo and
TorchScript. Nothing here changes the graph (node names aside) or reads a weight's values.

The rules:
- a *linear* is a MatMul (or Gemm) whose B is a 2-D float initializer, possibly through
  Transpose / Cast (a transposed Gemm counts as a Transpose);
- an *attention core* is either a fused op (GroupQueryAttention, MultiHeadAttention, Attention)
  or a Softmax between two activation x activation MatMuls (scores, then probs x V);
- q / k reach the scores MatMul as its first / second input, v reaches probs x V as its
  second input (or the fused op's query / key / value inputs; a lone query input is packed qkv);
- o consumes the attention output; down consumes Mul(act(gate), up); lm_head produces logits.
"""

from __future__ import annotations

import onnx_ir as ir

from ..errors import DfqError
from . import attention_sites, norm_sites, trace
from .trace import attr
from .site_types import (  # noqa: F401  (the types are part of this module's interface)
    Attention,
    Embedding,
    FLOAT_TYPES,
    FUSED_ATTENTION,
    Linear,
    Mlp,
    ModelSites,
    NormGain,
    PairSite,
    Role,
    WeightSource,
)


# ----------------------------------------------------------------------------- matching


def find_sites(model: ir.Model) -> ModelSites:
    graph = model.graph
    name_nodes(graph)
    order = {id(node): i for i, node in enumerate(graph)}
    linears = {node.name: lin for node in graph if (lin := _as_linear(node)) is not None}
    if not linears:
        raise DfqError(
            "no weight MatMuls found (MatMul/Gemm with a 2-D float initializer as B); "
            "is this an exported LLM with its weights as initializers?"
        )
    nodes = {node.name: node for node in graph}
    notes: list[str] = []

    cores = attention_sites.attention_cores(graph)
    attentions = attention_sites.match_attention(cores, linears, nodes, order, notes)
    mlps = _match_mlps(linears, nodes, order, attentions)
    embedding = _match_embedding(graph)
    lm_head = _match_lm_head(graph, linears, nodes, embedding)
    if embedding is not None and lm_head is not None:
        embedding.tied = linears[lm_head].weight.initializer == embedding.initializer
    _assign_layers(linears, attentions, mlps, nodes, order)
    _attach_biases(linears, nodes)
    for att in attentions:
        att.input_norm = norm_sites.norm_gain(nodes, linears, [x for x in (att.q, att.k, att.v, att.qkv) if x])
        if att.o:
            att.output_norm = norm_sites.output_norm(nodes[att.o], linears[att.o].n)
    for mlp in mlps:
        mlp.input_norm = norm_sites.norm_gain(nodes, linears, [mlp.gate, mlp.up])
        mlp.output_norm = norm_sites.output_norm(nodes[mlp.down], linears[mlp.down].n)
    blocked = [a.layer for a in attentions if a.qk_norm or a.rope != "half"]
    if blocked:
        why = "q/k norms" if any(a.qk_norm for a in attentions) else "RoPE layout is not half-split"
        notes.append(f"Q/K RoPE-commuting factors do not apply in {len(blocked)} of {len(attentions)} layers ({why})")
    vocab = embedding.vocab if embedding else (linears[lm_head].n if lm_head else None)
    return ModelSites(
        linears=linears,
        attentions=attentions,
        mlps=mlps,
        embedding=embedding,
        lm_head=lm_head,
        vocab=vocab,
        style=_guess_style(model, attentions),
        notes=notes,
        embedding_scale=norm_sites.embedding_scale(nodes[embedding.node]) if embedding else 1.0,
        kv_windows=_kv_windows(graph),
        unmatched=_unmatched(linears, nodes, lm_head),
        lm_head_norm=norm_sites.norm_gain(nodes, linears, [lm_head]) if lm_head else None,
    )


def name_nodes(graph: ir.Graph) -> None:
    """Give every node a unique name (deterministic: loading the same file twice gives the same names)."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def _as_linear(node: ir.Node) -> Linear | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    src = _weight_source(node.inputs[1])
    if src is None:
        return None
    value, transposed, via = src
    tensor = value.const_value
    if tensor is None or len(tensor.shape) != 2 or tensor.dtype not in FLOAT_TYPES:
        return None
    rows, cols = (int(d) for d in tensor.shape)
    if rows == 0 or cols == 0:
        return None  # an empty weight computes nothing to quantize
    bias = None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0:
            return None
        if attr(node, "transB", 0):
            transposed = not transposed
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if attr(node, "beta", 1.0) != 1.0:
                return None
            bias = node.inputs[2].name
    k, n = (cols, rows) if transposed else (rows, cols)
    weight = WeightSource(initializer=value.name, transposed=transposed, dtype=tensor.dtype.name, via=via)
    return Linear(node=node.name, op_type=node.op_type, k=k, n=n, weight=weight, bias=bias)


def _weight_source(value: ir.Value) -> tuple[ir.Value, bool, list[str]] | None:
    transposed = False
    via: list[str] = []
    while True:
        if value.is_initializer() and value.const_value is not None:
            return value, transposed, via
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Transpose" and tuple(attr(node, "perm", (1, 0))) == (1, 0):
            transposed = not transposed
        elif node.op_type not in ("Cast", "Identity"):
            return None
        via.append(node.name)
        value = node.inputs[0]


def _match_mlps(
    linears: dict[str, Linear], nodes: dict[str, ir.Node], order: dict[int, int], attentions: list[Attention]
) -> list[Mlp]:
    mlps = []
    for name, lin in linears.items():
        if lin.role != Role.OTHER:
            continue
        src = trace.back_through(nodes[name].inputs[0], ("Cast", "Identity", "Reshape"))
        mul = src.producer()
        if mul is None or mul.op_type != "Mul" or any(trace.is_constant(x) for x in mul.inputs):
            continue
        sides = [_gate_side(x, linears) for x in mul.inputs]
        direct = [s for s in sides if s and not s[1]]
        activated = [s for s in sides if s and s[1]]
        if len(direct) != 1 or len(activated) != 1:
            continue
        (up, _, up_cols), (gate, acts, gate_cols) = direct[0], activated[0]
        if nodes[up].inputs[0] is not nodes[gate].inputs[0] or linears[up].role != Role.OTHER:
            continue
        mlp = Mlp(layer=-1, gate=gate, up=up, down=name, activation="+".join(sorted(acts)))
        if up == gate:  # one linear computes both halves (Phi-3's gate_up_proj)
            halves = sorted(c for c in (gate_cols, up_cols) if c is not None)
            if len(halves) != 2 or halves[0][0] != 0 or halves[0][1] != halves[1][0] or halves[1][1] != linears[up].n:
                continue  # the halves must tile the output for the two parts to be quantized as one
            mlp.gate_columns, mlp.up_columns = gate_cols, up_cols
            linears[gate].role = Role.GATE_UP
        else:
            if gate_cols is not None or up_cols is not None:
                continue  # a slice of a linear that is not the whole gate / up: not a plain gated MLP
            linears[gate].role, linears[up].role = Role.GATE, Role.UP
        lin.role = Role.DOWN
        mlps.append(mlp)
    return mlps


def _gate_side(value: ir.Value, linears: dict[str, Linear]) -> tuple[str, set[str], tuple[int, int] | None] | None:
    """The one linear upstream of one side of the down projection's Mul, the activations crossed,
    and the column range of the linear this side reads when it crosses a Slice / Split."""
    found: set[str] = set()
    acts: set[str] = set()
    cut: set[tuple[int, int]] = set()
    frontier = [value]
    for _ in range(16):
        nxt = []
        for v in frontier:
            node = v.producer()
            if node is None:
                continue
            if node.name in linears:
                found.add(node.name)
                continue
            if node.op_type in ("MatMul", "Gemm", "Softmax") or node.op_type in FUSED_ATTENTION:
                return None
            if node.op_type in trace.ACTIVATIONS:
                acts.add(node.op_type)
            elif node.op_type in ("Slice", "Split"):
                source = node.inputs[0]
                producer = attention_sites.linear_through_bias(source)
                if producer is not None and producer.name in linears:
                    pieces = dict((id(out), cols) for out, cols in attention_sites.column_pieces(source, linears[producer.name].n))
                    if id(v) not in pieces:
                        return None
                    cut.add(pieces[id(v)])
                    found.add(producer.name)
                    continue
                return None
            elif node.op_type not in ("Cast", "Identity", "Mul", "Add", "Div", "Pow", "Sub", "Neg"):
                return None
            nxt.extend(x for x in node.inputs if x is not None and not trace.is_constant(x))
        frontier = nxt
        if not frontier:
            break
    if len(found) != 1 or len(cut) > 1:
        return None
    return found.pop(), acts, cut.pop() if cut else None


def _match_embedding(graph: ir.Graph) -> Embedding | None:
    token_inputs = {id(v) for v in graph.inputs if v.dtype in (ir.DataType.INT64, ir.DataType.INT32)}
    for node in graph:
        if node.op_type != "Gather" or attr(node, "axis", 0) != 0:
            continue
        idx = trace.back_through(node.inputs[1], ("Cast", "Identity"))
        if id(idx) not in token_inputs:
            continue
        src = _weight_source(node.inputs[0])
        if src is None:
            continue
        value, transposed, _ = src
        rows, cols = (int(d) for d in value.const_value.shape)
        vocab, hidden = (cols, rows) if transposed else (rows, cols)
        return Embedding(node.name, value.name, transposed, vocab, hidden)
    return None


def _match_lm_head(
    graph: ir.Graph, linears: dict[str, Linear], nodes: dict[str, ir.Node], embedding: Embedding | None
) -> str | None:
    outputs = {id(v) for v in graph.outputs}
    best = None
    for name, lin in linears.items():
        if lin.role != Role.OTHER:
            continue
        if embedding is not None and lin.n != embedding.vocab:
            continue
        out = nodes[name].outputs[0]
        reaches = id(out) in outputs
        if not reaches:
            _, passed = trace.forward(out, lambda n, i: n.op_type in ("MatMul", "Gemm", "Shape", "Softmax"))
            reaches = any(id(o) in outputs for n in passed for o in n.outputs)
        if reaches:
            best = name
    if best:
        linears[best].role = Role.LM_HEAD
    return best


def _assign_layers(
    linears: dict[str, Linear],
    attentions: list[Attention],
    mlps: list[Mlp],
    nodes: dict[str, ir.Node],
    order: dict[int, int],
) -> None:
    starts = []
    for i, att in enumerate(attentions):
        att.layer = i
        members = [x for x in (att.q, att.k, att.v, att.qkv, att.o) if x]
        for m in members:
            linears[m].layer = i
        starts.append(min(order[id(nodes[m])] for m in members))
    for mlp in mlps:
        pos = order[id(nodes[mlp.gate])]
        layer = max((i for i, s in enumerate(starts) if s < pos), default=0)
        mlp.layer = layer
        for m in (mlp.gate, mlp.up, mlp.down):
            linears[m].layer = layer


def _attach_biases(linears: dict[str, Linear], nodes: dict[str, ir.Node]) -> None:
    """A MatMul followed only by Add(constant [N]) has a bias: output-side transforms must move it too."""
    for name, lin in linears.items():
        if lin.op_type != "MatMul":
            continue
        users = list(trace.consumers(nodes[name].outputs[0]))
        if len(users) != 1 or users[0][0].op_type != "Add":
            continue
        add = users[0][0]
        other = add.inputs[1 - users[0][1]]
        if other is not None and other.is_initializer() and other.const_value is not None:
            shape = [int(d) for d in other.const_value.shape]
            if shape and shape[-1] == lin.n and all(d == 1 for d in shape[:-1]):
                lin.bias, lin.bias_add = other.name, add.name


def _kv_windows(graph: ir.Graph) -> dict[str, int]:
    """Past-KV inputs of GroupQueryAttention with a sliding-window cache: the runtime gives them
    `local_window_size` slots whatever the prompt length, and the op rejects fewer."""
    inputs = {id(v) for v in graph.inputs}
    out = {}
    for node in graph:
        if node.op_type == "GroupQueryAttention" and attr(node, "sliding_window_cache", 0):
            window = int(attr(node, "local_window_size", -1))
            for value in list(node.inputs)[3:5]:
                if value is not None and id(value) in inputs and window > 0:
                    out[value.name] = window
    return out


def _unmatched(linears: dict[str, Linear], nodes: dict[str, ir.Node], lm_head: str | None) -> dict[str, str]:
    """For each linear left outside every layer pattern: where its output went that the rules do not follow."""
    out = {}
    for name, lin in linears.items():
        if lin.role != Role.OTHER or name == lm_head:
            continue
        stops, passed = trace.forward(nodes[name].outputs[0], lambda n, i: not trace.flows_through(n, i))
        ends = sorted({f"{n.op_type} '{n.name}'" for n, _ in stops})
        where = ", ".join(ends[:3]) if ends else "nothing (its output is unused or a graph output)"
        out[name] = f"not part of an attention or gated MLP pattern; its output reaches {where}"
    return out


def _guess_style(model: ir.Model, attentions: list[Attention]) -> str:
    if any(a.kind == "GroupQueryAttention" for a in attentions):
        return "genai"
    names = [n.name for n in model.graph]
    if any(name.startswith("node_") for name in names):
        return "dynamo"
    if any("/" in name for name in names):
        return "torchscript"
    return "unknown"

