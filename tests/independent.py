"""Recomputations the tests compare the tool against, written without the tool's own quantization
code: logits and intermediate activations from ONNX Runtime, round-to-nearest in a few lines of
numpy, and the weights a written model computes with, unpacked from its ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

import tiny_models as T
from dfq_onnx.run.verify import feeds, logits_of, session


def kv_windows(path: Path) -> dict[str, int]:
    """Past-KV inputs of GroupQueryAttention with a sliding-window cache and their capacity: the
    runtime gives them `local_window_size` slots of zeros, and the op rejects fewer."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    out = {}
    for node in graph.node:
        a = _attrs(node) if node.op_type == "GroupQueryAttention" else {}
        if a.get("sliding_window_cache", 0) and a.get("local_window_size", -1) > 0:
            out.update({name: a["local_window_size"] for name in node.input[3:5] if name in inputs})
    return out


def _feeds(sess, path: Path, ids: np.ndarray, head_dim: int) -> dict[str, np.ndarray]:
    return feeds(sess, ids, head_dim, kv_windows(path))


def logits(path: Path, ids: np.ndarray, head_dim: int = T.HEAD_DIM) -> np.ndarray:
    """The logits ONNX Runtime computes, fed as the model's runtime would (sliding-window caches at
    their capacity)."""
    sess = session(path)
    return logits_of(sess, _feeds(sess, path, ids, head_dim))


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean per-token KL(ref || got) of two logit arrays [batch, seq, vocab], in float64."""
    lp, lq = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (ref.astype(np.float64), got.astype(np.float64)))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def activations(path: Path, names: list[str], ids: np.ndarray, scratch: Path, head_dim: int = T.HEAD_DIM) -> dict[str, np.ndarray]:
    """The values `names` take inside the model on `ids`, as ONNX Runtime computes them: a copy of
    the model (written to `scratch`, external data inlined) lists them as graph outputs."""
    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(scratch))
    sess = session(scratch)
    out = sess.run(names, _feeds(sess, path, ids, head_dim))
    return {n: a.astype(np.float64) for n, a in zip(names, out)}


def round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def rtn(w: np.ndarray, bits: int, block: int, symmetric: bool, scale_dtype=np.float32) -> np.ndarray:
    """Round-to-nearest of W[K, N] with min/max scales per block of `block` rows (K zero-padded),
    as ONNX Runtime's DEFAULT MatMulNBits quantizer: symmetric, the signed value of largest
    magnitude maps to the lowest level (scale = -v / 2^(b-1), zero point 2^(b-1)); asymmetric,
    [min(x, 0), max(x, 0)] spans the 2^b levels, zero point rounded. Scales are rounded to the
    model's float dtype. Returns the dequantized W_hat[K, N] in float64."""
    k, n = w.shape
    pad = -k % block
    x = np.concatenate([w.astype(np.float32), np.zeros((pad, n), np.float32)]).reshape(-1, block, n)
    top = (1 << bits) - 1
    if symmetric:
        mx, mn = x.max(1), x.min(1)
        signed = np.where(np.abs(mx) > np.abs(mn), mx, mn)
        scale = (-signed / np.float32(1 << (bits - 1))).astype(scale_dtype).astype(np.float32)
        zero = np.full_like(scale, 1 << (bits - 1))
    else:
        mn, mx = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
        scale = ((mx - mn) / np.float32(top)).astype(scale_dtype).astype(np.float32)
        raw = np.where(scale != 0, -mn / np.where(scale != 0, scale, 1), 0)
        zero = np.clip(round_half_away(raw), 0, top).astype(np.float32)
    inv = np.where(scale != 0, np.float32(1) / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    codes = np.clip(round_half_away(x * inv[:, None] + zero[:, None]), 0, top)
    return ((codes - zero[:, None]).astype(np.float64) * scale[:, None]).reshape(-1, n)[:k]


def weighted_error(w: np.ndarray, w_hat: np.ndarray, x: np.ndarray) -> float:
    """||X (W_hat - W)||^2 / ||X W||^2: the error of a linear's output on the activations X[t, K]."""
    x = x.reshape(-1, x.shape[-1])
    return float(np.linalg.norm(x @ (w_hat - w)) ** 2 / np.linalg.norm(x @ w) ** 2)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes from bytes along the last axis, least significant bits first."""
    if bits == 8:
        return packed.astype(np.int64)
    parts = [(packed.astype(np.int64) >> (bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)]
    return np.stack(parts, -1).reshape(*packed.shape[:-1], -1)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def quantized_linears(path: Path) -> dict[str, dict]:
    """Every MatMulNBits and DequantizeLinear -> MatMul of a written model, by node name:
    {"op", "bits", "block_size", "zero_points" (present or not), "codes" (unsigned, [N, K]),
    "zero" ([N, k_blocks] stored or implied), "w_hat" (float64 W_hat[K, N])}."""
    model = onnx.load(str(path))
    arrays = {t.name: t for t in model.graph.initializer}
    producer = {o: node for node in model.graph.node for o in node.output}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = _attrs(node)
            bits, block, k, n = a["bits"], a["block_size"], a["K"], a["N"]
            kb = -(-k // block)
            codes = _unpack(numpy_helper.to_array(arrays[node.input[1]]), bits).reshape(n, kb * block)
            scales = numpy_helper.to_array(arrays[node.input[2]]).astype(np.float64).reshape(n, kb)
            has_zp = len(node.input) > 3 and node.input[3] != ""
            if has_zp:
                zero = _unpack(numpy_helper.to_array(arrays[node.input[3]]), bits)[:, :kb].astype(np.float64)
            else:
                zero = np.full((n, kb), float(1 << (bits - 1)))
            w_hat = (codes - np.repeat(zero, block, 1)) * np.repeat(scales, block, 1)
            out[node.name] = dict(op="MatMulNBits", bits=bits, block_size=block, zero_points=has_zp, codes=codes[:, :k],
                                  zero=zero, w_hat=w_hat[:, :k].T)  # fmt: skip
        elif node.op_type == "MatMul" and node.input[1] in producer and producer[node.input[1]].op_type == "DequantizeLinear":
            dq = producer[node.input[1]]
            a = _attrs(dq)
            block, tensor = a["block_size"], arrays[dq.input[0]]
            values = numpy_helper.to_array(tensor).astype(np.int64)  # [K, N]: int4/uint4/int2/... as integers
            signed = tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT2)
            bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8,
                    onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}[tensor.data_type]  # fmt: skip
            k = values.shape[0]
            scales = numpy_helper.to_array(arrays[dq.input[1]]).astype(np.float64)  # [k_blocks, N]
            has_zp = len(dq.input) > 2 and dq.input[2] != ""
            zero = numpy_helper.to_array(arrays[dq.input[2]]).astype(np.float64) if has_zp else np.zeros_like(scales)
            w_hat = (values - np.repeat(zero, block, 0)[:k]) * np.repeat(scales, block, 0)[:k]
            offset = (1 << (bits - 1)) if signed else 0  # as unsigned codes, for comparison with MatMulNBits
            out[node.name] = dict(op="DequantizeLinear", bits=bits, block_size=block, zero_points=has_zp,
                                  codes=(values + offset).T, zero=(zero + offset).T, w_hat=w_hat)  # fmt: skip
    return out


def initializers(path: Path) -> dict[str, np.ndarray]:
    """Every initializer of a model, external data included, in float64 where it is floating point."""
    arrays = {i.name: numpy_helper.to_array(i, base_dir=str(path.parent)) for i in onnx.load(path, load_external_data=False).graph.initializer}
    return {name: a.astype(np.float64) if a.dtype.kind == "f" else a for name, a in arrays.items()}


def rotations_in_front(path: Path, linears: list[str]) -> dict[str, tuple[str, str, np.ndarray] | None]:
    """For each linear (node name): the inserted rotation it reads, found in the written graph itself,
    as (name of the rotating MatMul, its constant's name, the constant b x b block in float64), or None
    when its input is not rotated.

    A rotation is what insert_block_rotation builds: x -> Reshape -> MatMul(x, T[b, b] constant) ->
    Reshape -> the linear; only Reshapes may stand between the rotating MatMul and the linear."""
    graph = onnx.load(path, load_external_data=False).graph
    consts = initializers(path)
    producer = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    found = {}
    for name in linears:
        node, hit = producer.get(by_name[name].input[0]), None
        while node is not None and node.op_type == "Reshape":
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "MatMul" and node.name not in linears:
            block = consts.get(node.input[1])
            if block is not None and block.ndim == 2 and block.shape[0] == block.shape[1]:
                hit = (node.name, node.input[1], block)
        found[name] = hit
    return found
