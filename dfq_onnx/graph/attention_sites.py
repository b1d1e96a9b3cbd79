"""Attention cores (fused ops, or Softmax between two activation MatMuls) and the linears that feed
them: q/k/v (packed or not), o, head geometry, the RoPE layout and rotated width."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from . import trace
from .trace import attr
from .site_types import FUSED_ATTENTION, Attention, Linear, Role


@dataclasses.dataclass
class _Core:
    """One attention computation: where q, k, v enter and where its output leaves."""

    kind: str
    anchor: ir.Node  # the node that orders cores (scores MatMul or fused op)
    ends: dict[str, tuple[ir.Node, int]]  # "q" / "k" / "v" / "qkv" -> (node, input index)
    output: ir.Value
    fused: ir.Node | None = None


def attention_cores(graph: ir.Graph) -> list[_Core]:
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


def match_attention(
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


def linear_through_bias(value: ir.Value) -> ir.Node | None:
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

