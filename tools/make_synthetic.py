"""Synthetic Gemma 2 ONNX models at real sizes: the exact graph of an export, random weights.

    python tools/make_synthetic.py --shape gemma2-2b -o models/synthetic/gemma2-2b/model.onnx
    python tools/make_synthetic.py --shape gemma2-9b -o models/synthetic/gemma2-9b/model.onnx
    python tools/make_synthetic.py --shape gemma2-2b --style genai -o models/synthetic/gemma2-2b-genai/model.onnx

The graph is a real torch.onnx (dynamo) export of transformers' Gemma2ForCausalLM at the
requested shape, traced with stand-in parameters that take no memory (one zero broadcast to
the full shape); or, with --style genai, the onnxruntime-genai builder's graph (fp16, CUDA
flavour: GroupQueryAttention, KV cache), built at the real widths on three layers and grown to
full depth (synthetic_genai.py). The weights are then generated and streamed straight into the external data
file, a few rows at a time: the model is never held in RAM, so a 9B model is made on a
machine with less memory than its weights.

Weights are Gaussian with the spread of a trained model (std 1/sqrt(K)) and planted outlier
input channels (1% of K, 8x larger), the regime real LLM weights live in; norm gains are
spread around Gemma's 1 + w. Generation is seeded per tensor, so the same command gives the
same bytes. Output is written to a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

OUTLIER_FRACTION = 0.01
OUTLIER_GAIN = 8.0
CHUNK_ELEMENTS = 1 << 24  # values generated per step (64 MB of float32)


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int = 4096


SHAPES = {
    "gemma2-2b": Shape(256000, 2304, 9216, 26, 8, 4, 256),
    "gemma2-9b": Shape(256000, 3584, 14336, 42, 16, 8, 256),
    # small shapes for tests: the same graph, seconds to build and to optimise
    "gemma2-tiny": Shape(1000, 256, 704, 6, 4, 2, 64, sliding_window=16),
}


def gemma2_config(shape: Shape, layers: int | None = None):
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=layers or shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        query_pre_attn_scalar=shape.head_dim,
        sliding_window=shape.sliding_window,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def export_graph(config, dtype: str):
    """The dynamo export of the model, traced with parameters that occupy one element each."""
    import torch
    from accelerate import init_empty_weights
    from transformers import Gemma2ForCausalLM

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with init_empty_weights(include_buffers=False):
        model = Gemma2ForCausalLM(config).eval()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                stand_in = torch.zeros(1, dtype=torch_dtype).expand(p.shape)
                module._parameters[name] = torch.nn.Parameter(stand_in, requires_grad=False)
    for module in model.modules():  # rotary buffers follow the activations' type
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                module._buffers[name] = b.float()

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.zeros(1, 8, dtype=torch.long)
    mask = torch.ones_like(ids)
    dims = {0: "batch", 1: "sequence"}
    program = torch.onnx.export(
        LogitsOnly(model).eval(),  # inference graph: no training-mode ops
        (ids, mask),
        dynamo=True,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": dims, "attention_mask": dims},
        optimize=True,
    )
    return program.model


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def weight_chunks(name: str, shape: tuple[int, ...], input_axis: int | None, seed: int):
    """Row chunks (float32) of one synthetic tensor, reproducible from (seed, name)."""
    rng = np.random.Generator(np.random.PCG64(_seed(name, seed)))
    if len(shape) == 1:  # a norm gain, stored as w in Gemma's (1 + w)
        yield rng.normal(0.0, 0.1, size=shape).astype(np.float32)
        return
    rows, cols = shape
    k = shape[input_axis] if input_axis is not None else cols
    std = 1.0 / np.sqrt(k)
    outliers = rng.choice(k, size=max(1, int(k * OUTLIER_FRACTION)), replace=False)
    gain = np.ones(k, dtype=np.float32)
    gain[outliers] = OUTLIER_GAIN
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(std)
        if input_axis == 0:
            block *= gain[start : start + n, None]
        else:
            block *= gain[None, :]
        yield block


def role_of(value) -> tuple[str, int | None] | None:
    """What a float initializer of the export is, from how the graph uses it: ('matrix', input axis) or ('gain', None).

    Names cannot be trusted: the exporter folds transposes of small weights and Gemma's 1 + w of
    the norm gains into new constants, exactly as it does for a real model of the same shape.
    """
    import onnx_ir as ir

    tensor = value.const_value
    if tensor is None or tensor.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT):
        return None
    dims = [int(d) for d in tensor.shape]
    if "inv_freq" in value.name or min(dims, default=0) <= 1 and len(dims) != 1:
        return None
    ops = {use.node.op_type for use in value.uses()}
    if len(dims) == 2:
        if "MatMul" in ops or "Gemm" in ops:
            return "matrix", 0  # stored [K, N] (a builder's tied lm_head also feeds the embedding's Transpose)
        if "Gather" in ops:
            return "embedding", 1  # rows are tokens; outliers live in hidden channels
        if ops == {"Transpose"}:
            return "matrix", 1  # stored [N, K] behind a Transpose
        return None  # rotary caches and other tables keep their values
    if len(dims) == 1 and dims[0] >= 16:
        return "gain", None
    return None


def write_model(model, target: Path, dtype: str, seed: int, log=print) -> int:
    """Stream synthetic values for every weight and gain of the export into target's data file."""
    import onnx_ir as ir

    np_dtype = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}[dtype]
    ir_types = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
    location = f"{target.name}.data"
    offset = 0
    started = shown = time.perf_counter()
    jobs = [(name, value, role_of(value)) for name, value in model.graph.initializers.items()]
    for _, value, role in jobs:  # kept tables (rotary caches) stored inline: nothing may point into another file
        if role is None and isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
    jobs = [(n, v, r) for n, v, r in jobs if r is not None]
    total = sum(v.const_value.nbytes for _, v, _ in jobs)
    with open(target.parent / location, "wb") as data:
        for name, value, (kind, axis) in jobs:
            old = value.const_value
            stored = tuple(int(d) for d in old.shape)
            out_dtype = np_dtype if old.dtype != ir.DataType.FLOAT else np.dtype(np.float32)
            ir_dtype = ir_types[dtype] if old.dtype != ir.DataType.FLOAT else ir.DataType.FLOAT
            if kind == "gain":  # stored w (graph adds 1) or the folded 1 + w: keep the stored form's centre
                centre = float(np.asarray(old.numpy(), dtype=np.float32).reshape(-1)[0]) if old.size else 0.0
                chunks = (c + np.float32(centre) for c in weight_chunks(name, stored, None, seed))
            else:
                chunks = weight_chunks(name, stored, axis, seed)
            start = offset
            for chunk in chunks:
                raw = chunk.astype(out_dtype).view(np.uint8).reshape(-1)
                data.write(memoryview(raw))
                offset += raw.nbytes
            value.const_value = ir.ExternalTensor(
                location, offset=start, length=offset - start, dtype=ir_dtype, shape=ir.Shape(stored), name=name,
                base_dir=str(target.parent),
            )  # fmt: skip
            pad = (-offset) % 64
            data.write(b"\0" * pad)
            offset += pad
            now = time.perf_counter()
            if now - shown > 5 or offset >= total:  # a line every few seconds: readable in logs too
                shown = now
                rate = offset / 2**20 / max(now - started, 1e-9)
                log(f"  weights {min(offset / total, 1):6.1%}  {offset / 2**30:6.2f} GiB  {rate:5.0f} MiB/s")
    ir.save(model, target)
    return offset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma2-2b", help="model size [gemma2-2b]")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers (same widths)")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="weight type [fp16]")
    parser.add_argument(
        "--style", choices=["dynamo", "genai"], default="dynamo",
        help="export graph: torch.onnx dynamo, or the onnxruntime-genai builder's (GroupQueryAttention, KV cache) [dynamo]",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights [0]")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path (its .data beside it)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    out = args.output
    if out.suffix != ".onnx":
        parser.error("the output should end in .onnx")
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to rebuild it", file=sys.stderr)
        return 0
    shape = SHAPES[args.shape]
    config = gemma2_config(shape, args.layers)
    started = time.perf_counter()
    print(f"exporting the graph of {args.shape} ({config.num_hidden_layers} layers, {args.style}) ...", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        extra = []
        if args.style == "genai":
            import onnx_ir as ir
            import synthetic_genai

            template = synthetic_genai.build_template(config, args.dtype, tmp / "template")
            model = ir.load(template)
            synthetic_genai.replicate_layers(model, config.num_hidden_layers)
            synthetic_genai.write_genai_config(template.parent, tmp, config.num_hidden_layers)
            extra = ["genai_config.json"]
        else:
            model = export_graph(config, args.dtype)
        size = write_model(model, tmp / out.name, args.dtype, args.seed, log=lambda *a, **k: print(*a, **k, file=sys.stderr))
        for name in (*extra, f"{out.name}.data", out.name):  # data first, model last
            os.replace(tmp / name, out.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{out}: {size / 2**30:.2f} GiB of {args.dtype} weights, {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
