"""Loading an ONNX model without pulling its weights into RAM, and reading one weight at a time.

onnx_ir keeps external initializers as references to their files. Weights are read with
plain positioned reads into fresh buffers (not memory maps), so the pages of a weight leave
the process with the weight: resident memory follows the largest tensor in flight.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ..errors import DfqError

# Ops that show a model was quantized already; quantizing it again would stack errors.
QUANTIZED_OPS = {
    ("com.microsoft", "MatMulNBits"),
    ("com.microsoft", "GatherBlockQuantized"),
    ("com.microsoft", "MatMulInteger16"),
    ("com.microsoft", "DynamicQuantizeMatMul"),
    ("com.microsoft", "MatMulIntegerToFloat"),
    ("com.microsoft", "QOrderedMatMul"),
    ("", "QLinearMatMul"),
    ("", "MatMulInteger"),
    ("", "DequantizeLinear"),
    ("com.microsoft", "DequantizeLinear"),
}

_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    ir.DataType.DOUBLE: np.dtype(np.float64),
}
# (the same-width unsigned integer, the exponent's bits) of each float type
_EXPONENT_BITS = {
    np.dtype(np.float32): (np.uint32, np.uint32(0x7F800000)),
    np.dtype(np.float16): (np.uint16, np.uint16(0x7C00)),
    np.dtype(ml_dtypes.bfloat16): (np.uint16, np.uint16(0x7F80)),
    np.dtype(np.float64): (np.uint64, np.uint64(0x7FF0000000000000)),
}


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load the graph; check that the file is ONNX, its external data is whole, and it is not quantized."""
    path = Path(path)
    if not path.exists():
        raise DfqError(f"{path}: no such file; give the path of an .onnx model")
    if path.is_dir():
        raise DfqError(f"{path} is a directory; give the path of the .onnx file inside it")
    with _captured_warnings("onnx_ir") as warned:
        try:
            model = ir.load(path)
        except Exception as exc:  # protobuf raises several unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DfqError(f"{path} is not a readable ONNX model ({first[:120]}); check the file") from None
    if len(model.graph) == 0:
        raise DfqError(f"{path} is not a readable ONNX model (empty graph); check the file")
    dangling = [r.args for r in warned if "cannot be found in any scope" in r.msg]
    if dangling:
        value, node = dangling[0][:2]
        raise DfqError(f"{path.name} is not a valid graph: node '{node}' reads '{value}', which nothing produces; re-export the model")
    if not model.graph.outputs:
        raise DfqError(f"{path.name} has no graph outputs; export the model with its logits as an output")
    check_external_data(model, path)
    check_not_quantized(model, path)
    return model


@contextlib.contextmanager
def _captured_warnings(name: str):
    """Keep a library's log records off the terminal (the CLI prints one line of its own) and hand them back."""
    logger = logging.getLogger(name)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, propagate = Keep(level=logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_path = Path(tensor.path)
        if data_path.is_dir():
            raise DfqError(f"external data '{tensor.location}' of {path.name} is a directory, not a file; put the model's data file there")
        if not data_path.is_file():
            raise DfqError(
                f"external data file '{tensor.location}' of {path.name} is missing "
                f"(needed by '{value.name}'); put it beside the model in {path.parent}"
            )
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        size = data_path.stat().st_size
        if end > size:
            raise DfqError(
                f"external data file '{tensor.location}' is truncated ({size} bytes, "
                f"'{value.name}' needs {end}); copy the complete file again"
            )


def check_not_quantized(model: ir.Model, path: Path) -> None:
    for node in model.graph.all_nodes():
        if (node.domain or "", node.op_type) in QUANTIZED_OPS:
            raise DfqError(
                f"{path.name} is already quantized (it contains {node.op_type}); "
                "give the float (fp32/fp16) export instead"
            )


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def check_finite(model: ir.Model, names: list[str]) -> None:
    """Refuse NaN or Inf in the given float initializers before any work (read one at a time)."""
    for name in names:
        value = model.graph.initializers.get(name)
        if value is not None and value.const_value is not None and value.const_value.dtype in _NUMPY_DTYPES:
            check_array_finite(read_array(value.const_value), name)


def check_array_finite(arr: np.ndarray, name: str) -> None:
    """NaN and Inf are the floats whose exponent bits are all ones: read as integers, no conversion."""
    bits = _EXPONENT_BITS.get(arr.dtype)
    if bits is None:
        return
    flat = arr.reshape(-1).view(bits[0])
    for start in range(0, flat.size, 1 << 22):  # bounded temporaries on large weights
        if (flat[start : start + (1 << 22)] & bits[1]).max(initial=0) == bits[1]:
            raise DfqError(f"weight '{name}' contains NaN or Inf values; fix or re-export the model")


def external_data_files(model: ir.Model) -> set[Path]:
    """Resolved paths of every external data file the model reads."""
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path).resolve())
    return files


def numpy_dtype(dtype: ir.DataType) -> np.dtype:
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise DfqError(f"unsupported weight type {dtype.name}; export the model in fp32 or fp16") from None


def read_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor's values in a fresh, writable array; external data read with pread, not mmap."""
    if isinstance(tensor, ir.ExternalTensor):
        dtype = numpy_dtype(tensor.dtype)
        count = int(np.prod(tensor.shape.numpy())) if len(tensor.shape) else 1
        out = np.empty(count, dtype=dtype)
        view = memoryview(out.view(np.uint8))
        with open(tensor.path, "rb", buffering=0) as f:
            f.seek(tensor.offset or 0)
            got = f.readinto(view)
        if got != view.nbytes:
            raise DfqError(f"external data of '{tensor.name}' ends early ({got} of {view.nbytes} bytes)")
        return out.reshape(tensor.shape.numpy())
    return np.array(tensor.numpy(), copy=True)


def iter_rows(tensor: ir.TensorProtocol, transposed: bool, rows_per_block: int = 4096):
    """Row blocks of a matrix M (M = tensor, or tensor^T when `transposed`) without loading it whole.

    A transposed external tensor is read as column segments of each stored row (positioned reads).
    """
    stored_rows, stored_cols = (int(d) for d in tensor.shape)
    if not isinstance(tensor, ir.ExternalTensor):
        arr = np.asarray(tensor.numpy())
        arr = arr.T if transposed else arr
        for i in range(0, arr.shape[0], rows_per_block):
            yield np.array(arr[i : i + rows_per_block], dtype=np.float32)
        return
    dtype = numpy_dtype(tensor.dtype)
    item = dtype.itemsize
    with open(tensor.path, "rb", buffering=0) as f:
        base = tensor.offset or 0
        if not transposed:
            for i in range(0, stored_rows, rows_per_block):
                n = min(rows_per_block, stored_rows - i)
                buf = np.empty(n * stored_cols, dtype=dtype)
                f.seek(base + i * stored_cols * item)
                f.readinto(memoryview(buf.view(np.uint8)))
                yield buf.reshape(n, stored_cols).astype(np.float32)
            return
        for j in range(0, stored_cols, rows_per_block):
            n = min(rows_per_block, stored_cols - j)
            out = np.empty((n, stored_rows), dtype=np.float32)
            seg = np.empty(n, dtype=dtype)
            for r in range(stored_rows):
                f.seek(base + (r * stored_cols + j) * item)
                f.readinto(memoryview(seg.view(np.uint8)))
                out[:, r] = seg
            yield out
