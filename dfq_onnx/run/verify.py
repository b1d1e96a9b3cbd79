"""Before publishing: ONNX Runtime (CPU) runs the written model on random token ids and gates it.

All checks feed the same ids (random ids are not data: they only show what a model computes):
- the output runs and its logits are finite;
- with `compare`, the input runs too and the report says how far the logits moved;
- exactness: the exact mirror (every float transform applied, nothing rounded) gives the input's
  logits, so no transform changed the function;
- fidelity: the written model gives the logits of the dequantized mirror (float MatMuls with the
  method's dequantized weights), so the packed bytes and the rewired graph are what was computed.
A failed check raises VerificationFailed naming the first layer and sublayer whose output broke.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DfqError
from ..graph.sites import ModelSites

SEQ_LEN = 16

# Limits on max|a - b| / max|b| over the logits. Measured on the tiny test models (tests/test_verify_gate.py,
# tests/test_families.py): correct fp32 runs give <= 1e-6 for both checks; fp16 exports give ~1e-3 (every
# weight the transforms touch is rounded to fp16 once more, and fp16 MatMuls accumulate differently).
# The limits keep a 1000x (fp32) and 10x (fp16) margin; planted defects measured 0.15 to 1.2.
EXACT_LIMIT = {"float32": 1e-3, "float16": 1e-2}
FIDELITY_LIMIT = {"float32": 1e-3, "float16": 1e-2}


class VerificationFailed(DfqError):
    """The written model does not compute what it should; it is not published."""


def ort():
    try:
        import onnxruntime
    except ImportError:
        raise DfqError(
            "ONNX Runtime is not installed: pip install 'dfq-onnx[cpu]' (or [gpu]), or pass --verify none"
        ) from None
    return onnxruntime


def session(path: Path, threads: int | None = None, label: str | None = None, serialized: bytes | None = None):
    """A CPU session of `path`, or of `serialized` (a changed copy of it, whose external data is
    read from `path`'s folder)."""
    rt = ort()
    opts = rt.SessionOptions()
    # Fused QDQ -> MatMulNBits defaults to int8 activations on CPU; keep float for a fair check.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if serialized is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
    try:
        return rt.InferenceSession(serialized if serialized is not None else str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DfqError(f"ONNX Runtime cannot load {label or path.name}: {first_line(exc)}") from None


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def feeds(sess, ids: np.ndarray, head_dim: int | None, windows: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs for a causal LM export as its runtime gives them: ids, an all-ones mask, positions,
    and empty past caches, except sliding-window caches of fixed capacity (`windows`), which get
    their full capacity of zeros as onnxruntime-genai allocates them."""
    out: dict[str, np.ndarray] = {}
    windows = windows or {}
    batch, seq = ids.shape
    for spec in sess.get_inputs():
        name = spec.name
        if name == "input_ids":
            out[name] = ids.astype(np.int64 if "int64" in spec.type else np.int32)
        elif name == "attention_mask":
            out[name] = np.ones((batch, seq), dtype=np.int64 if "int64" in spec.type else np.int32)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif name == "cache_position":
            out[name] = np.arange(seq, dtype=np.int64)
        elif name.startswith("past_key_values") or name.startswith("past_"):
            dtype = np.float16 if "float16" in spec.type else np.float32
            shape = []
            for i, dim in enumerate(spec.shape):
                if isinstance(dim, int):
                    shape.append(dim)
                elif i == 0:
                    shape.append(batch)
                elif "past" in str(dim) or i == 2:
                    shape.append(windows.get(name, 0))
                else:
                    shape.append(head_dim or 1)
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            raise DfqError(f"cannot feed model input '{name}' ({spec.type}); use --verify none")
    return out


def logits_name(sess, label: str = "the model") -> str:
    """The output holding the logits: "logits", else the first output."""
    return pick_logits([o.name for o in sess.get_outputs()], label)


def pick_logits(names: list[str], label: str = "the model") -> str:
    """Of a graph's output names, the logits': "logits", else the first."""
    if not names:
        raise DfqError(f"{label} has no graph outputs; export it with its logits as an output")
    return "logits" if "logits" in names else names[0]


def logits_of(sess, feed: dict[str, np.ndarray], label: str = "the model") -> np.ndarray:
    name = logits_name(sess, label)
    try:
        return sess.run([name], feed)[0].astype(np.float32)
    except Exception as exc:
        raise DfqError(f"ONNX Runtime cannot run {label}: {first_line(exc)}") from None


def model_logits(path: Path, ids: np.ndarray, sites: ModelSites, label: str | None = None) -> np.ndarray:
    sess = session(path, label=label)
    return logits_of(sess, feeds(sess, ids, head_dim_of(sites), sites.kv_windows), label or path.name)


def head_dim_of(sites: ModelSites) -> int | None:
    return next((a.head_dim for a in sites.attentions if a.head_dim), None)


def relative(a: np.ndarray, ref: np.ndarray) -> float:
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(a - ref).max()) / scale


def check_output(
    input_path: Path,
    output_path: Path,
    sites: ModelSites,
    compare: bool = True,
    exact: Path | None = None,
    dequantized: Path | None = None,
    float_output: bool = False,
    dtype: str = "float32",
    scratch: Path | None = None,
    fidelity_path: Path | None = None,
) -> dict[str, Any]:
    """Run the written model; compare it with the input and the mirrors. `fidelity_path`: the copy
    whose weights the fidelity check compares, when the written model's own arithmetic differs
    by design (int8 activations: MatMulNBits accuracy_level 4)."""
    ids = np.random.default_rng(1234).integers(0, sites.vocab or 2, size=(1, SEQ_LEN))
    t0 = time.perf_counter()
    try:
        got = model_logits(output_path, ids, sites, "the written model")
    except DfqError:
        model_logits(input_path, ids, sites, f"the input model {input_path.name}")  # blame the input when it is the broken one
        raise
    result: dict[str, Any] = {"ran": True, "tokens": int(ids.size), "finite": bool(np.isfinite(got).all())}
    if not result["finite"]:
        raise VerificationFailed(
            f"the written model produced non-finite logits; nothing was published (work files kept in {output_path.parent})"
        )
    checks = []
    if compare or exact is not None or float_output:
        ref = model_logits(input_path, ids, sites, "the input model")
        diff = np.abs(got - ref)
        result.update(
            max_abs_error=float(diff.max()),
            mean_abs_error=float(diff.mean()),
            rel_max_error=relative(got, ref),
            top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
        )
        if float_output:  # the written model is itself the exact one
            checks.append(("exactness", output_path, input_path, got, ref, EXACT_LIMIT[dtype]))
        elif exact is not None:
            checks.append(("exactness", exact, input_path, model_logits(exact, ids, sites, "the exact mirror"), ref, EXACT_LIMIT[dtype]))
    if dequantized is not None:
        expected = model_logits(dequantized, ids, sites, "the dequantized mirror")
        probe = fidelity_path or output_path
        written = got if fidelity_path is None else model_logits(probe, ids, sites, "the written model at accuracy level 0")
        checks.append(("fidelity", probe, dequantized, written, expected, FIDELITY_LIMIT[dtype]))
        if fidelity_path is not None:
            result["fidelity_without_accuracy_level"] = True
    for name, path, ref_path, a, b, limit in checks:
        error = relative(a, b)
        result[f"{name}_rel_error"] = error
        result[f"{name}_limit"] = limit
        if not error <= limit:
            where = first_divergence(path, ref_path, sites, ids, limit, scratch or output_path.parent)
            what = (
                "the float transforms changed the model's function"
                if name == "exactness"
                else "the written weights are not the ones the method computed"
            )
            raise VerificationFailed(
                f"{name} check failed: {what} (logits off by {error:.2e} relative, limit {limit:.0e}; "
                f"first at {where}); nothing was published, work files kept in {output_path.parent}"
            )
    result["checks"] = [c[0] for c in checks]
    result["seconds"] = time.perf_counter() - t0
    return result


def without_accuracy_level(path: Path) -> Path | None:
    """A copy of the graph (same data file) whose MatMulNBits compute in float: what the fidelity
    check compares, since int8 activations move logits by ~1e-2 by design. None if none is set."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            changed |= len(kept) != len(node.attribute)
            del node.attribute[:]
            node.attribute.extend(kept)
    if not changed:
        return None
    copy = path.with_name(f".{path.stem}.accuracy0.onnx")
    onnx.save(model, str(copy))
    return copy


# ----------------------------------------------------------------------------- finding where it broke


def first_divergence(path: Path, ref_path: Path, sites: ModelSites, ids: np.ndarray, limit: float, scratch: Path) -> str:
    """The first sublayer (attention, MLP) whose output differs beyond `limit` between two models.

    Transforms leave each sublayer's output (o's, down's) unchanged, so these values are comparable
    across the input, the mirrors and the written model. Found by running both models once more with
    those values as extra outputs.
    """
    probes = []
    for att in sites.attentions:
        if att.o:
            probes.append((f"layer {att.layer} attention", att.o))
        mlp = next((m for m in sites.mlps if m.layer == att.layer), None)
        if mlp:
            probes.append((f"layer {att.layer} MLP", mlp.down))
    try:
        a = _probe(path, [name for _, name in probes], ids, sites, scratch / ".probe-a")
        b = _probe(ref_path, [name for _, name in probes], ids, sites, scratch / ".probe-b")
    except Exception as exc:  # localisation is a courtesy: the failure itself is already established
        return f"an unknown place ({first_line(exc)})"
    for label, name in probes:
        if name in a and name in b and relative(a[name], b[name]) > limit:
            return f"{label} ({name})"
    return "the lm_head or embedding (every layer's output matches)"


def _probe(path: Path, linears: list[str], ids: np.ndarray, sites: ModelSites, probe_dir: Path) -> dict[str, np.ndarray]:
    """Run a copy of the model that also outputs each linear's result (found under its own or its
    replacement's name), from a scratch folder holding hard links to (or copies of) the model's
    data files: ONNX Runtime refuses data outside the model's folder, and the input's own folder is
    never written."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    by_name = {node.name: node for node in model.graph.node}
    wanted = {}
    for lin in linears:
        node = by_name.get(lin) or next(
            (n for n in model.graph.node if n.name.startswith(f"{lin}_Q") and n.op_type in ("MatMulNBits", "MatMul")), None
        )
        if node is not None:
            wanted[node.output[0]] = lin
    for value, lin in wanted.items():
        elem = onnx.TensorProto.FLOAT16 if sites.linears[lin].weight.dtype == "FLOAT16" else onnx.TensorProto.FLOAT
        model.graph.output.append(onnx.helper.make_tensor_value_info(value, elem, None))
    probe_dir.mkdir(exist_ok=True)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and not (probe_dir / entry.value).exists():
                _link_or_copy(path.parent / entry.value, probe_dir / entry.value)
    probe = probe_dir / path.name
    onnx.save(model, str(probe))
    sess = session(probe, label=f"a probe of {path.name}")
    feed = feeds(sess, ids, head_dim_of(sites), sites.kv_windows)
    names = list(wanted)
    values = sess.run(names, feed)
    return {wanted[n]: v.astype(np.float32) for n, v in zip(names, values)}



def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copyfile(src, dst)
