"""What the method decided for one unit, as plain data: the seam between the math and the graph.

A plan holds numpy arrays and names only (no graph objects, no file offsets): per linear its
rounded weight (or, for float output, its transformed float weight), the float tensors it changed
(norm gains, moved biases), the online rotations to insert, and what the report says of each
site. Passes (dfq_onnx.passes) apply a plan to a graph; a checkpoint is the list of finished plans,
each saved as one .npz of arrays with a JSON header (read back with allow_pickle=False). The file
also carries the transformed float weights the exactness check needs (when the run verifies
them), and a digest of everything in it, checked when it is read: a plan changed or damaged on
disk is refused, never applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from .config import QuantFormat
from .errors import DfqError
from .graph import pack
from .report import SiteResult

FORMAT = 2


class DamagedPlan(DfqError):
    """A saved plan that is not what the run wrote (changed or damaged since)."""


@dataclasses.dataclass
class QuantizedWeight:
    """A rounded W[K, N]: container codes per block of K, scales in the activation dtype."""

    codes: np.ndarray  # uint8 [N, k_blocks, block_size]
    scales: np.ndarray  # [N, k_blocks], float16 or float32
    zero_points: np.ndarray | None  # uint8 [N, k_blocks]; None: symmetric
    k: int
    fmt: QuantFormat

    @property
    def n(self) -> int:
        return self.codes.shape[0]

    def dequantize(self) -> np.ndarray:
        """W_hat[K, N] in float32, as the kernels compute (q - z) * s."""
        mid = 1 << (self.fmt.container_bits - 1)
        z = np.full(self.scales.shape, mid, np.uint8) if self.zero_points is None else self.zero_points
        codes = self.codes.transpose(1, 2, 0).astype(np.float32)  # [k_blocks, block_size, N]
        rows = (codes - z.T.astype(np.float32)[:, None, :]) * self.scales.T.astype(np.float32)[:, None, :]
        return rows.reshape(-1, self.n)[: self.k]


@dataclasses.dataclass
class OnlineRotation:
    """x' = x blockdiag(T) computed at inference in front of linears that read one activation."""

    linears: list[str]
    block: np.ndarray  # T [b, b] in the activation dtype
    k: int
    layer: int | None


@dataclasses.dataclass
class UnitPlan:
    label: str
    quantized: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)  # linear -> rounded W
    float_weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # linear -> W[K, N] (float output)
    gains: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # norm gain initializer -> new gain (multiplicative)
    biases: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # linear -> its output bias, moved with its columns
    online: list[OnlineRotation] = dataclasses.field(default_factory=list)
    embedding: QuantizedWeight | None = None  # the head unit: the embedding table rounded as [hidden, vocab]
    embedding_tied: bool = False  # ... and it is the lm_head's own weight (its bytes are shared)
    sites: list[SiteResult] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> "UnitPlan":
        """What the report needs once the plan is applied: sites, notes and rotations, no weights
        (a run keeps one per unit: holding the rounded weights would grow with the model)."""
        return dataclasses.replace(self, quantized={}, float_weights={}, gains={}, biases={}, embedding=None)


def save(plan: UnitPlan, path: Path, exact_weights: dict[str, np.ndarray] | None = None) -> None:
    """One .npz: the arrays, and a JSON header that names them and holds their digest (written
    whole, then renamed). `exact_weights`: linear -> the float W[K, N] that was rounded."""
    arrays: dict[str, np.ndarray] = {}

    def put(array: np.ndarray | None) -> str | None:
        if array is None:
            return None
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(array)
        return key

    def quantized(q: QuantizedWeight) -> dict:
        bits = q.fmt.container_bits  # codes travel packed: the checkpoint is about the size of the output
        return {
            "codes": put(pack.pack_along_last(q.codes, bits)),
            "codes_shape": list(q.codes.shape),
            "scales": put(q.scales),
            "zero_points": put(q.zero_points),
            "k": q.k,
            "fmt": [q.fmt.bits, q.fmt.block_size, q.fmt.symmetric],
        }

    header = {
        "format": FORMAT,
        "label": plan.label,
        "quantized": {name: quantized(q) for name, q in plan.quantized.items()},
        "float_weights": {name: put(w) for name, w in plan.float_weights.items()},
        "gains": {name: put(g) for name, g in plan.gains.items()},
        "biases": {name: put(b) for name, b in plan.biases.items()},
        "online": [{"linears": r.linears, "block": put(r.block), "k": r.k, "layer": r.layer} for r in plan.online],
        "embedding": None if plan.embedding is None or plan.embedding_tied else quantized(plan.embedding),
        "embedding_tied": plan.embedding_tied,
        "sites": [dataclasses.asdict(s) for s in plan.sites],
        "notes": plan.notes,
        "exact_weights": {name: put(w) for name, w in (exact_weights or {}).items()},
    }
    header["digest"] = _digest(header, arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _digest(header: dict, arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the header (its digest aside) and of every array's name, type, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "digest"}, sort_keys=True).encode())
    for key in sorted(arrays):
        a = arrays[key]
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def load(path: Path) -> tuple[UnitPlan, dict[str, np.ndarray]]:
    """The plan and its exact float weights (empty when the run did not keep them); DamagedPlan when
    the file's content does not match the digest it was written with."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        header = json.loads(bytes(arrays.pop("header")).decode())
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise DamagedPlan(f"{path.name} cannot be read ({type(exc).__name__})") from None
    if header.get("format") != FORMAT:
        raise DamagedPlan(f"{path.name} has plan format {header.get('format')}, this version writes {FORMAT}")
    if header.get("digest") != _digest(header, arrays):
        raise DamagedPlan(f"{path.name} does not match the digest it was written with (changed or damaged since)")
    return _from_header(header, arrays), {name: arrays[k] for name, k in header["exact_weights"].items()}


def _from_header(header: dict, data: dict[str, np.ndarray]) -> UnitPlan:
    def get(key: str | None) -> np.ndarray | None:
        return None if key is None else data[key]

    def quantized(d: dict) -> QuantizedWeight:
        fmt = QuantFormat(*d["fmt"])
        n, kb, bs = d["codes_shape"]
        codes = pack.unpack_along_last(get(d["codes"]), fmt.container_bits, bs).reshape(n, kb, bs)
        return QuantizedWeight(codes, get(d["scales"]), get(d["zero_points"]), d["k"], fmt)

    plan = UnitPlan(
        label=header["label"],
        quantized={name: quantized(d) for name, d in header["quantized"].items()},
        float_weights={name: get(k) for name, k in header["float_weights"].items()},
        gains={name: get(k) for name, k in header["gains"].items()},
        biases={name: get(k) for name, k in header["biases"].items()},
        online=[OnlineRotation(r["linears"], get(r["block"]), r["k"], r["layer"]) for r in header["online"]],
        embedding_tied=header["embedding_tied"],
        sites=[SiteResult(**s) for s in header["sites"]],
        notes=header["notes"],
    )
    if header["embedding"] is not None:
        plan.embedding = quantized(header["embedding"])
    elif plan.embedding_tied:
        plan.embedding = next(iter(plan.quantized.values()))
    return plan
