"""Bit packing of container codes into the byte layouts ONNX Runtime reads.

MatMulNBits: B is uint8 [N, k_blocks, block_size * bits / 8], packed along K, least
significant bits first; packed zero points are uint8 [N, ceil(k_blocks * bits / 8)] with the
unused tail filled by the midpoint, as ORT's own quantizer writes them.

QDQ (ONNX int4/uint4/int2/uint2/int8/uint8 tensors): W[K, N] row-major, neighbouring
elements along N share a byte, least significant bits first (onnx_ir.PackedTensor does that).
"""

from __future__ import annotations

import numpy as np


def pack_along_last(values: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Pack unsigned codes (< 2^bits) along the last axis, low bits first; pad with `fill`."""
    if bits == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    per_byte = 8 // bits
    *lead, length = values.shape
    padded = -(-length // per_byte) * per_byte
    v = values.astype(np.uint8, copy=False)
    if padded != length:
        pad = np.full((*lead, padded - length), fill, dtype=np.uint8)
        v = np.concatenate([v, pad], axis=-1)
    v = v.reshape(*lead, padded // per_byte, per_byte)
    out = np.zeros((*lead, padded // per_byte), dtype=np.uint8)
    for i in range(per_byte):
        out |= (v[..., i] & ((1 << bits) - 1)) << (bits * i)
    return out


def unpack_along_last(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of pack_along_last."""
    if bits == 8:
        return packed[..., :length].copy()
    per_byte = 8 // bits
    parts = [(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    out = np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :length]


def matmulnbits_b(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes uint8 [N, k_blocks, block_size] -> B uint8 [N, k_blocks, block_size * bits / 8]."""
    return pack_along_last(codes, bits)


def matmulnbits_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """zero points uint8 [N, k_blocks] -> packed uint8 [N, ceil(k_blocks * bits / 8)]."""
    return pack_along_last(zero_points, bits, fill=1 << (bits - 1))
