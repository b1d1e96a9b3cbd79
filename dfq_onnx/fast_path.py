"""Whether a written linear hits ONNX Runtime's fast CUDA kernel (the mixed-precision GEMM that
prefill uses; ../docs: onnxruntime-gpu 1.31 from PyPI). Decode-sized batches (M <= 16) have GEMV
kernels for every layout without float zero points; larger M falls back to dequantize + cuBLAS
on every run unless the GEMM path takes the node."""

from __future__ import annotations

from .config import QuantFormat

GEMM_BLOCK = {4: 32, 8: 32, 2: 64}  # container bits -> the block size the GEMM path is built for
N_MULTIPLE = 64


def cuda_gemm_misses(fmt: QuantFormat, k: int, n: int, half_activations: bool) -> list[str]:
    """Why the CUDA GEMM path would not take this linear; empty when it does."""
    why = []
    bits = fmt.container_bits
    if fmt.bits == 3:
        why.append("3-bit codes (stored in 4-bit containers) are not a CUDA layout")
    if bits not in GEMM_BLOCK:
        why.append(f"{bits}-bit")
    elif fmt.block_size != GEMM_BLOCK[bits]:
        why.append(f"block {fmt.block_size} (needs {GEMM_BLOCK[bits]})")
    if not fmt.symmetric:
        why.append("zero points")
    if n % N_MULTIPLE:
        why.append(f"N={n} not a multiple of {N_MULTIPLE}")
    if k % fmt.block_size:
        why.append(f"K={k} not a multiple of the block")
    if not half_activations:
        why.append("fp32 activations (needs fp16/bf16)")
    return why
