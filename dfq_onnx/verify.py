"""After writing: ONNX Runtime (CPU) loads the output and runs it on random token ids.

With `compare`, the input model runs on the same ids and the logits are compared. Random ids
are not data: they only show that the model executes and how far its outputs moved.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DfqError
from .graph.sites import ModelSites

SEQ_LEN = 16


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise DfqError(
            "ONNX Runtime is not installed: pip install 'dfq-onnx[cpu]' (or [gpu]), or pass --verify none"
        ) from None
    return onnxruntime


def session(path: Path, threads: int | None = None):
    rt = ort()
    opts = rt.SessionOptions()
    # Fused QDQ -> MatMulNBits defaults to int8 activations on CPU; keep float for a fair check.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return rt.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DfqError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:300]}") from None


def feeds(sess, ids: np.ndarray, head_dim: int | None) -> dict[str, np.ndarray]:
    """Inputs for a causal LM export: ids, an all-ones mask, positions, empty past caches."""
    out: dict[str, np.ndarray] = {}
    batch, seq = ids.shape
    for spec in sess.get_inputs():
        name = spec.name
        if name == "input_ids":
            out[name] = ids.astype(np.int64 if "int64" in spec.type else np.int32)
        elif name == "attention_mask":
            out[name] = np.ones((batch, seq), dtype=np.int64 if "int64" in spec.type else np.int32)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif name.startswith("past_key_values") or name.startswith("past_"):
            dtype = np.float16 if "float16" in spec.type else np.float32
            shape = []
            for i, dim in enumerate(spec.shape):
                if isinstance(dim, int):
                    shape.append(dim)
                elif i == 0:
                    shape.append(batch)
                elif "past" in str(dim) or i == 2:
                    shape.append(0)
                else:
                    shape.append(head_dim or 1)
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            raise DfqError(f"cannot feed model input '{name}' ({spec.type}); use --verify none")
    return out


def logits_of(sess, feed: dict[str, np.ndarray]) -> np.ndarray:
    names = [o.name for o in sess.get_outputs()]
    index = names.index("logits") if "logits" in names else 0
    return sess.run([names[index]], feed)[0].astype(np.float32)


def check_output(input_path: Path, output_path: Path, sites: ModelSites, compare: bool = True) -> dict[str, Any]:
    head_dim = next((a.head_dim for a in sites.attentions if a.head_dim), None)
    vocab = sites.vocab or 2
    ids = np.random.default_rng(1234).integers(0, vocab, size=(1, SEQ_LEN))
    t0 = time.perf_counter()
    out_sess = session(output_path)
    got = logits_of(out_sess, feeds(out_sess, ids, head_dim))
    result: dict[str, Any] = {
        "ran": True,
        "tokens": int(ids.size),
        "finite": bool(np.isfinite(got).all()),
        "output_seconds": time.perf_counter() - t0,
    }
    del out_sess
    if compare:
        ref_sess = session(input_path)
        ref = logits_of(ref_sess, feeds(ref_sess, ids, head_dim))
        diff = np.abs(got - ref)
        scale = float(np.abs(ref).max()) or 1.0
        result.update(
            max_abs_error=float(diff.max()),
            mean_abs_error=float(diff.mean()),
            rel_max_error=float(diff.max()) / scale,
            top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
        )
    if not result["finite"]:
        raise DfqError(f"{output_path.name} produced non-finite logits; please report this model")
    return result
