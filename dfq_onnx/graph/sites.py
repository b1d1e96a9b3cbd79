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

import dataclasses
import enum
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ..errors import DfqError
from . import trace
from .trace import attr

FUSED_ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention"}
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


class Role(str, enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    QKV = "qkv"
    O = "o"
    GATE = "gate"
    UP = "up"
    GATE_UP = "gate_up"  # gate and up columns in one linear (Phi-3), split after the MatMul
    DOWN = "down"
    LM_HEAD = "lm_head"
    OTHER = "other"


@dataclasses.dataclass
class WeightSource:
    """Where a linear's W[K, N] lives: an initializer, maybe seen through Transpose / Cast."""

    initializer: str
    transposed: bool  # W = initializer^T
    dtype: str
    via: list[str]  # names of the Transpose / Cast nodes in between


@dataclasses.dataclass
class Linear:
    node: str
    op_type: str
    k: int
    n: int
    weight: WeightSource
    role: Role = Role.OTHER
    layer: int | None = None
    bias: str | None = None  # the [N] bias initializer: Gemm's C input, or the constant of an Add right after
    bias_add: str | None = None  # that Add node, when the bias is a node of its own (MatMul -> Add)


@dataclasses.dataclass
class NormGain:
    """A multiplicative per-channel gain right before a group of linears (RMSNorm's gamma)."""

    node: str
    op_type: str
    input_index: int
    initializer: str
    plus_one: bool  # the graph computes gain = 1 + w from the initializer w
    consumers: list[str]
    exclusive: bool  # the normalised output feeds only these linears: folding is exact


@dataclasses.dataclass
class Attention:
    layer: int
    kind: str  # fused op type, or "decomposed"
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # packed q|k|v columns in one linear
    qkv_split: tuple[int, int, int] | None = None
    o: str | None = None
    rope: str = "unknown"  # "half" (pairs i, i + d/2), "interleaved", "none", "unknown"
    rotary_dim: int | None = None
    qk_norm: bool = False
    input_norm: NormGain | None = None
    output_norm: NormGain | None = None  # a norm on the attention output before the residual add (Gemma)

    @property
    def group_size(self) -> int | None:
        if self.num_heads and self.num_kv_heads:
            return self.num_heads // self.num_kv_heads
        return None


@dataclasses.dataclass
class Mlp:
    layer: int
    gate: str
    up: str
    down: str
    activation: str
    input_norm: NormGain | None = None
    output_norm: NormGain | None = None
    # One fused linear (gate == up): the column ranges [start, end) of its gate and up halves.
    gate_columns: tuple[int, int] | None = None
    up_columns: tuple[int, int] | None = None

    @property
    def fused(self) -> bool:
        return self.gate == self.up


@dataclasses.dataclass
class Embedding:
    node: str
    initializer: str
    transposed: bool  # Gather reads Transpose(initializer)
    vocab: int
    hidden: int
    tied: bool = False  # lm_head reads the same initializer


@dataclasses.dataclass
class PairSite:
    """Two linears that multiply each other, recorded for paired transforms."""

    kind: str  # "vo", "up_down", "qk"
    layer: int
    first: str
    second: str
    detail: dict


@dataclasses.dataclass
class ModelSites:
    linears: dict[str, Linear]
    attentions: list[Attention]
    mlps: list[Mlp]
    embedding: Embedding | None
    lm_head: str | None
    vocab: int | None
    style: str
    notes: list[str]
    embedding_scale: float = 1.0  # the constant the embedding lookup is multiplied by
    # Past-KV graph inputs of sliding-window layers whose cache has a fixed capacity (the onnxruntime-genai
    # builder's default windowed cache): input name -> capacity the runtime allocates.
    kv_windows: dict[str, int] = dataclasses.field(default_factory=dict)
    # Linears the matcher could not place in a layer's structure, and why (they get no pairing).
    unmatched: dict[str, str] = dataclasses.field(default_factory=dict)

    def by_role(self, role: Role) -> list[Linear]:
        return [lin for lin in self.linears.values() if lin.role == role]

    def layers(self) -> list[int]:
        return sorted({lin.layer for lin in self.linears.values() if lin.layer is not None})

    def pairs(self) -> list[PairSite]:
        out: list[PairSite] = []
        for att in self.attentions:
            v = att.v or att.qkv
            q = att.q or att.qkv
            k = att.k or att.qkv
            if v and att.o and att.head_dim and att.num_kv_heads:
                out.append(PairSite("vo", att.layer, v, att.o, self._vo_detail(att)))
            if q and k and att.head_dim:
                out.append(
                    PairSite(
                        "qk",
                        att.layer,
                        q,
                        k,
                        {"rope": att.rope, "qk_norm": att.qk_norm, "applies": att.rope == "half" and not att.qk_norm},
                    )
                )
        for mlp in self.mlps:
            out.append(PairSite("up_down", mlp.layer, mlp.up, mlp.down, {}))
        return out

    @staticmethod
    def _vo_detail(att: Attention) -> dict:
        d, g = att.head_dim, att.group_size or 1
        v_offset = (att.qkv_split[0] + att.qkv_split[1]) if att.qkv and att.qkv_split else 0
        heads = []
        for j in range(att.num_kv_heads):
            heads.append(
                {
                    "kv_head": j,
                    "v_columns": [v_offset + j * d, v_offset + (j + 1) * d],
                    "o_rows": [[h * d, (h + 1) * d] for h in range(j * g, (j + 1) * g)],
                }
            )
        return {"head_dim": d, "group_size": g, "heads": heads}


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

    cores = _attention_cores(graph)
    attentions = _match_attention(cores, linears, nodes, order, notes)
    mlps = _match_mlps(linears, nodes, order, attentions)
    embedding = _match_embedding(graph)
    lm_head = _match_lm_head(graph, linears, nodes, embedding)
    if embedding is not None and lm_head is not None:
        embedding.tied = linears[lm_head].weight.initializer == embedding.initializer
    _assign_layers(linears, attentions, mlps, nodes, order)
    _attach_biases(linears, nodes)
    for att in attentions:
        att.input_norm = _norm_gain(nodes, linears, [x for x in (att.q, att.k, att.v, att.qkv) if x])
        if att.o:
            att.output_norm = _output_norm(nodes[att.o], linears[att.o].n)
    for mlp in mlps:
        mlp.input_norm = _norm_gain(nodes, linears, [mlp.gate, mlp.up])
        mlp.output_norm = _output_norm(nodes[mlp.down], linears[mlp.down].n)
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
        embedding_scale=_embedding_scale(nodes[embedding.node]) if embedding else 1.0,
        kv_windows=_kv_windows(graph),
        unmatched=_unmatched(linears, nodes, lm_head),
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


@dataclasses.dataclass
class _Core:
    """One attention computation: where q, k, v enter and where its output leaves."""

    kind: str
    anchor: ir.Node  # the node that orders cores (scores MatMul or fused op)
    ends: dict[str, tuple[ir.Node, int]]  # "q" / "k" / "v" / "qkv" -> (node, input index)
    output: ir.Value
    fused: ir.Node | None = None


def _attention_cores(graph: ir.Graph) -> list[_Core]:
    cores: list[_Core] = []
    for node in graph:
        if node.op_type in FUSED_ATTENTION and node.domain in ("com.microsoft", "", "ai.onnx"):
            ins = list(node.inputs) + [None] * 3
            if ins[1] is None and ins[2] is None:
                ends = {"qkv": (node, 0)}
            else:
                ends = {"q": (node, 0), "k": (node, 1), "v": (node, 2)}
            cores.append(_Core(node.op_type, node, ends, node.outputs[0], fused=node))
        elif node.op_type == "Softmax":
            core = _decomposed_core(node)
            if core is not None:
                cores.append(core)
    return cores


def _decomposed_core(softmax: ir.Node) -> _Core | None:
    probs = softmax.outputs[0]
    pv = None
    stops, _ = trace.forward(probs, lambda n, i: n.op_type == "MatMul")
    for node, idx in stops:
        if idx == 0 and not trace.is_constant(node.inputs[1]):
            pv = node
            break
    scores = _upstream_matmul(softmax.inputs[0])
    if pv is None or scores is None:
        return None
    return _Core(
        "decomposed",
        scores,
        {"q": (scores, 0), "k": (scores, 1), "v": (pv, 1)},
        pv.outputs[0],
    )


def _upstream_matmul(value: ir.Value, depth: int = 12) -> ir.Node | None:
    """Nearest activation x activation MatMul upstream of the softmax input (skipping the mask path)."""
    frontier = [value]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            node = v.producer()
            if node is None:
                continue
            if node.op_type == "MatMul":
                if not trace.is_constant(node.inputs[1]) and not trace.is_constant(node.inputs[0]):
                    return node
                continue
            nxt.extend(x for x in node.inputs if x is not None and not trace.is_constant(x))
        frontier = nxt
    return None


def _match_attention(
    cores: list[_Core],
    linears: dict[str, Linear],
    nodes: dict[str, ir.Node],
    order: dict[int, int],
    notes: list[str],
) -> list[Attention]:
    end_index = {}
    for ci, core in enumerate(cores):
        for role, (node, idx) in core.ends.items():
            end_index[(id(node), idx)] = (ci, role)

    def is_stop(node: ir.Node, idx: int) -> bool:
        return (id(node), idx) in end_index or node.op_type in ("MatMul", "Gemm", "Softmax", "Shape", "Size")

    reached: dict[int, dict[str, list[tuple[str, list[ir.Node]]]]] = defaultdict(lambda: defaultdict(list))
    for name, lin in linears.items():
        stops, passed = trace.forward(nodes[name].outputs[0], is_stop)
        hits = {end_index[(id(n), i)] for n, i in stops if (id(n), i) in end_index}
        cores_hit = {ci for ci, _ in hits}
        if len(cores_hit) != 1:
            continue
        ci = cores_hit.pop()
        roles = {role for _, role in hits}
        role = "qkv" if roles >= {"q", "k", "v"} or roles == {"qkv"} else (roles.pop() if len(roles) == 1 else None)
        if role is None:
            notes.append(f"{name} feeds several inputs of one attention ({sorted(roles)}): left as 'other'")
            continue
        reached[ci][role].append((name, passed))

    attentions: list[Attention] = []
    for ci in sorted(reached, key=lambda c: order[id(cores[c].anchor)]):
        core = cores[ci]
        found = reached[ci]
        if any(len(v) != 1 for v in found.values()):
            notes.append(f"attention at {core.anchor.name}: ambiguous projections, not paired")
            continue
        att = Attention(layer=-1, kind=core.kind, num_heads=None, num_kv_heads=None, head_dim=None)
        for role, [(name, passed)] in found.items():
            setattr(att, role, name)
            linears[name].role = Role(role)
            if role in ("q", "qkv"):
                att.qk_norm = any(n.op_type in trace.NORM_OPS or n.op_type == "ReduceMean" for n in passed)
                # The builder's fp16/CUDA exports hand q/k norm gains to GroupQueryAttention itself (inputs 14, 15).
                att.qk_norm |= core.fused is not None and any(x is not None for x in list(core.fused.inputs)[12:])
                att.rope, att.rotary_dim = _rope_layout(core, passed)
        _head_geometry(att, core, linears, nodes, notes)
        if att.head_dim and att.rotary_dim and att.rotary_dim > att.head_dim:
            att.rotary_dim = None  # the smallest slice seen was a q|k|v column range, not a RoPE half
        if att.head_dim and att.rope == "half" and core.fused is None:
            q_passed = next((passed for role, [(_, passed)] in found.items() if role in ("q", "qkv")), [])
            width = _rotate_half_width(q_passed, att.head_dim)
            if width == UNRESOLVED:
                att.rope, att.rotary_dim = "unknown", None
                notes.append(f"attention at {core.anchor.name}: the rotary width is computed at run time; Q/K rotations skipped")
            else:
                att.rotary_dim = width or att.rotary_dim
        att.o = _match_o(core, linears, nodes)
        if att.o:
            linears[att.o].role = Role.O
        attentions.append(att)
    return attentions


def _rotate_half_width(passed: list[ir.Node], head_dim: int) -> int | None:
    """The width r of the tensor that rotate_half cuts into [0, r/2) and [r/2, r) (r < head_dim under
    partial rotary), following each value's last dimension from the per-head Reshape on: TorchScript
    writes those bounds as Shape(x)[-1] // 2, which only the known widths evaluate."""
    last: dict[int, tuple[int, int | None]] = {}  # id(value) -> (last dimension, rank)
    widths = set()
    unresolved = set()
    for _ in range(4):  # the walk is breadth-first: a few passes settle every width
        for node in passed:
            x = node.inputs[0] if node.inputs else None
            width = None
            if node.op_type == "Reshape":
                dims = trace.partial_ints(node.inputs[1])
                width = (dims[-1], len(dims)) if dims and dims[-1] == head_dim else None
            elif node.op_type == "Transpose":
                perm = attr(node, "perm", None)
                width = last.get(id(x)) if perm is not None and perm[-1] == len(perm) - 1 else None
            elif node.op_type == "Slice" and x is not None and id(x) in last:
                axes = trace.const_array(node.inputs[3]) if len(node.inputs) > 3 else None
                n, rank = last[id(x)]
                if axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, (rank or 4) - 1):
                    start, end = (trace.scalar_int(v, last) for v in node.inputs[1:3])
                    if start is None or end is None:
                        unresolved.add(id(node))  # e.g. Phi-3's q[..., :cos.shape[-1]] in TorchScript
                    else:
                        unresolved.discard(id(node))
                        start, end = (v + n if v < 0 else min(v, n) for v in (start, end))
                        width = (end - start, rank)
                        if n % 2 == 0 and (start, end) in ((0, n // 2), (n // 2, n)):
                            widths.add(n)
            elif node.op_type in ("Mul", "Add", "Sub", "Neg", "Cast", "Div"):
                width = next((last[id(v)] for v in node.inputs if v is not None and id(v) in last), None)
            elif node.op_type == "Concat" and attr(node, "axis", 0) in (-1, 3):
                parts = [last.get(id(v)) for v in node.inputs]
                width = (sum(p[0] for p in parts), parts[0][1]) if all(p is not None for p in parts) else None
            if width is not None and node.outputs:
                last[id(node.outputs[0])] = width
    # Only cuts of a per-head tensor are counted (a q|k|v split precedes the per-head Reshape).
    if unresolved:
        return UNRESOLVED
    return min(widths) if widths else None


UNRESOLVED = -1  # a cut of a per-head tensor whose bounds the graph computes from shapes we cannot follow


def _match_o(core: _Core, linears: dict[str, Linear], nodes: dict[str, ir.Node]) -> str | None:
    stops, _ = trace.forward(
        core.output,
        lambda n, i: n.op_type in ("MatMul", "Gemm", "Softmax", "Shape") or n.op_type in FUSED_ATTENTION,
    )
    cands = [n.name for n, i in stops if i == 0 and n.name in linears]
    return cands[0] if len(cands) == 1 else None


def _head_geometry(
    att: Attention, core: _Core, linears: dict[str, Linear], nodes: dict[str, ir.Node], notes: list[str]
) -> None:
    if core.fused is not None:
        heads = attr(core.fused, "num_heads")
        kv = attr(core.fused, "kv_num_heads", heads)
        if att.qkv:
            total = linears[att.qkv].n
            d = total // (heads + 2 * kv) if heads else None
            if d and total == d * (heads + 2 * kv):
                att.qkv_split = (heads * d, kv * d, kv * d)
        else:
            d = linears[att.q].n // heads if att.q and heads else None
        att.num_heads, att.num_kv_heads, att.head_dim = heads, kv, d
        return
    if att.qkv:
        _packed_geometry(att, core, linears, nodes, notes)
        return
    d = _reshape_head_dim(nodes[att.q].outputs[0]) if att.q else None
    if d is None and att.k:
        d = _reshape_head_dim(nodes[att.k].outputs[0])
    if d and att.q and linears[att.q].n % d == 0:
        att.head_dim = d
        att.num_heads = linears[att.q].n // d
        if att.k and linears[att.k].n % d == 0:
            att.num_kv_heads = linears[att.k].n // d
    else:
        notes.append(f"attention at {core.anchor.name}: head size not found; V/O and Q/K pairs disabled")


def _packed_geometry(att: Attention, core: _Core, linears, nodes, notes: list[str]) -> None:
    """q|k|v in one linear without a fused attention op (Phi-3 in torch exports): the column
    ranges come from the Slice / Split that cut its output, each traced to the input it reaches."""
    lin = linears[att.qkv]
    ends = {(id(node), idx): role for role, (node, idx) in core.ends.items()}

    def reaches(value: ir.Value) -> str | None:
        stops, _ = trace.forward(value, lambda n, i: (id(n), i) in ends or n.op_type in ("MatMul", "Gemm", "Softmax"))
        roles = {ends[(id(n), i)] for n, i in stops if (id(n), i) in ends}
        return roles.pop() if len(roles) == 1 else None

    pieces = {}
    for value, (start, end) in column_pieces(_after_bias(nodes[att.qkv].outputs[0]), lin.n):
        role = reaches(value)
        if role in ("q", "k", "v"):
            pieces[role] = (start, end)
    if set(pieces) != {"q", "k", "v"} or [pieces[r] for r in ("q", "k", "v")] != sorted(pieces.values()):
        notes.append(f"attention at {core.anchor.name}: packed qkv whose q|k|v columns were not found; V/O and Q/K pairs disabled")
        return
    (q0, q1), (k0, k1), (v0, v1) = (pieces[r] for r in ("q", "k", "v"))
    if not (q0 == 0 and q1 == k0 and k1 == v0 and v1 == lin.n):
        notes.append(f"attention at {core.anchor.name}: packed qkv columns {pieces} do not tile the output; pairs disabled")
        return
    att.qkv_split = (q1 - q0, k1 - k0, v1 - v0)
    d = None
    for value, (start, _) in column_pieces(_after_bias(nodes[att.qkv].outputs[0]), lin.n):
        if start == 0:
            d = _reshape_head_dim(value)
    if d and all(width % d == 0 for width in att.qkv_split):
        att.head_dim, att.num_heads, att.num_kv_heads = d, att.qkv_split[0] // d, att.qkv_split[1] // d
    else:
        notes.append(f"attention at {core.anchor.name}: head size of the packed qkv not found; V/O and Q/K pairs disabled")


def _after_bias(value: ir.Value) -> ir.Value:
    """The output of a linear, past the bias Add that directly follows it (if any)."""
    users = list(trace.consumers(value))
    if len(users) == 1 and users[0][0].op_type == "Add" and any(trace.is_constant(x) for x in users[0][0].inputs):
        return users[0][0].outputs[0]
    return value


def _linear_through_bias(value: ir.Value) -> ir.Node | None:
    """The node computing `value`, or the MatMul before the constant bias Add that computes it."""
    node = value.producer()
    if node is not None and node.op_type == "Add" and any(trace.is_constant(x) for x in node.inputs):
        inner = next(x for x in node.inputs if not trace.is_constant(x)).producer()
        if inner is not None and inner.op_type in ("MatMul", "Gemm"):
            return inner
    return node


def column_pieces(value: ir.Value, n: int) -> list[tuple[ir.Value, tuple[int, int]]]:
    """Values cut from the last axis of `value` [..., n] by Slice (constant starts/ends, step 1) or Split."""
    out = []
    for node, idx in trace.consumers(value):
        if idx != 0:
            continue
        if node.op_type == "Slice":
            start, end = (trace.scalar_int(x, {id(value): (n, 3)}) for x in node.inputs[1:3])  # [batch, seq, n]
            axes = trace.const_array(node.inputs[3]) if len(node.inputs) > 3 else None
            steps = trace.const_array(node.inputs[4]) if len(node.inputs) > 4 else None
            if start is None or end is None or not _is_last_axis(axes, value):
                continue
            if steps is not None and int(steps.reshape(-1)[0]) != 1:
                continue
            start, end = (x + n if x < 0 else min(x, n) for x in (start, end))
            out.append((node.outputs[0], (start, end)))
        elif node.op_type == "Split" and _is_last_axis(np.array([attr(node, "axis", 0)]), value):
            sizes = trace.const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
            sizes = [int(x) for x in sizes.reshape(-1)] if sizes is not None else list(attr(node, "split", []) or [])
            if not sizes:
                parts = len(node.outputs)
                sizes = [-(-n // parts)] * (parts - 1) + [n - (parts - 1) * -(-n // parts)]
            start = 0
            for output, size in zip(node.outputs, sizes):
                out.append((output, (start, start + size)))
                start += size
    return out


def _is_last_axis(axes: np.ndarray | None, value: ir.Value) -> bool:
    if axes is None or axes.size != 1:
        return False
    axis = int(axes.reshape(-1)[0])
    if value.shape is None:  # TorchScript leaves intermediate shapes out: activations are [batch, seq, features]
        return axis in (-1, 2)
    return axis in (-1, len(value.shape) - 1)


def _reshape_head_dim(value: ir.Value) -> int | None:
    """The head size from the first Reshape after a projection ([..., heads, head_dim])."""
    stops, _ = trace.forward(value, lambda n, i: n.op_type in ("Reshape", "MatMul", "Softmax", "Shape"))
    for node, idx in stops:
        if node.op_type == "Reshape" and idx == 0:
            dims = trace.partial_ints(node.inputs[1])
            if dims and dims[-1] and dims[-1] > 0:
                return dims[-1]
    return None


def _rope_layout(core: _Core, passed: list[ir.Node]) -> tuple[str, int | None]:
    if core.fused is not None and core.fused.op_type == "GroupQueryAttention":
        if attr(core.fused, "do_rotary", 0):
            # cos_cache is [positions, rotary_dim / 2]: less than half the head under partial rotary (Phi-4-mini).
            cos = core.fused.inputs[7] if len(core.fused.inputs) > 7 else None
            rotary = 2 * int(cos.shape[-1]) if cos is not None and cos.shape is not None and isinstance(cos.shape[-1], int) else None
            return ("interleaved" if attr(core.fused, "rotary_interleaved", 0) else "half"), rotary
    for node in passed:
        if node.op_type == "RotaryEmbedding":
            return ("interleaved" if attr(node, "interleaved", 0) else "half"), None
    negs = [n for n in passed if n.op_type == "Neg"]
    if not negs:
        return "none", None
    for node in passed:
        if node.op_type == "Slice" and len(node.inputs) >= 5:
            steps = trace.const_array(node.inputs[4])
            if steps is not None and abs(int(steps.reshape(-1)[0])) == 2:
                return "interleaved", None
    half_sizes = []
    for node in passed:
        if node.op_type == "Slice":
            starts = trace.const_array(node.inputs[1])
            ends = trace.const_array(node.inputs[2]) if len(node.inputs) > 2 else None
            if starts is not None and ends is not None:
                s, e = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
                if 0 <= s < e < 1 << 30:
                    half_sizes.append(e - s)
    # rotate_half cuts [0, r/2) and [r/2, end); a q|k|v split or a partial rotary cut is wider.
    rotary = 2 * min(half_sizes) if half_sizes else None
    return "half", rotary


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
                producer = _linear_through_bias(source)
                if producer is not None and producer.name in linears:
                    pieces = dict((id(out), cols) for out, cols in column_pieces(source, linears[producer.name].n))
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


def _norm_gain(nodes: dict[str, ir.Node], linears: dict[str, Linear], members: list[str]) -> NormGain | None:
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


def _output_norm(linear_node: ir.Node, n: int) -> NormGain | None:
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


def _embedding_scale(gather: ir.Node) -> float:
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


def _guess_style(model: ir.Model, attentions: list[Attention]) -> str:
    if any(a.kind == "GroupQueryAttention" for a in attentions):
        return "genai"
    names = [n.name for n in model.graph]
    if any(name.startswith("node_") for name in names):
        return "dynamo"
    if any("/" in name for name in names):
        return "torchscript"
    return "unknown"
