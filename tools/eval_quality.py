#!/usr/bin/env python3
"""Honest quality evaluation of ONNX language models through ONNX Runtime.

Protocol: the text is tokenized once with the
model's tokenizer, cut into non-overlapping windows of BOS + 511 tokens, and
the first N windows are run through the reference and every candidate ONNX
model on the CPU provider with MatMulNBits accuracy level 0. Per model we
report perplexity on the text and, against the reference, the mean per-token
KL(reference || candidate) and top-1 agreement with the reference's argmax.

Every model is fed generically by input name, so dynamo exports
(input_ids, attention_mask -> logits) and onnxruntime-genai exports (plus
past_key_values.* with past length 0, position_ids) can be compared.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

import janeausten  # noqa: E402  (sibling module: the text)
import realmodel  # noqa: E402  (sibling module: the real models and their folders)


def model_paths(name: str) -> tuple[Path, Path]:
    """(fp32 dynamo reference, tokenizer folder) of a real model built by its tools/build_*.py."""
    out = realmodel.spec(name).out
    return out / "dynamo" / "model.onnx", out / "hf"


DEFAULT_REFERENCE, DEFAULT_TOKENIZER = model_paths(realmodel.DEFAULT_MODEL)
DEFAULT_DATA_DIR = REPO / "data"
WINDOW = 512  # BOS + 511 text tokens; also Gemma 3's sliding window
ROW_CHUNK = 32  # rows of logits per metric step: 32 x 262144 x 4 B = 32 MB temporaries


class EvalError(RuntimeError):
    """Bad input to the evaluation (missing file, unusable model, short text)."""


# --------------------------------------------------------------------------- sessions


def make_session(path: str | os.PathLike, threads: int | None = None, provider: str = "CPUExecutionProvider"):
    """Session (CPU unless told) with accuracy level 0 for any fused/explicit MatMulNBits."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # ORT's QDQ->MatMulNBits fusion defaults to level 4 (int8 activations on CPU),
    # which would blur the weight-quantization error we are trying to measure.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=providers)


_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _np_type(ort_type: str):
    if ort_type not in _NP_TYPES:
        raise EvalError(f"unsupported input type {ort_type}")
    return _NP_TYPES[ort_type]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _head_size_hint(model_path: Path) -> int | None:
    """Head size for a symbolic KV-cache dim, from files beside the model."""
    genai = _read_json(model_path.parent / "genai_config.json")
    if genai:
        size = genai.get("model", {}).get("decoder", {}).get("head_size")
        if size:
            return int(size)
    for cfg_path in (model_path.parent / "config.json", DEFAULT_TOKENIZER / "config.json"):
        cfg = _read_json(cfg_path)
        if cfg:
            cfg = cfg.get("text_config", cfg)
            if cfg.get("head_dim"):
                return int(cfg["head_dim"])
            if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
                return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


class OrtLM:
    """One ONNX causal LM: builds feeds by input name and returns float32 logits."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, provider: str = "CPUExecutionProvider"):
        self.path = Path(path)
        if not self.path.is_file():
            raise EvalError(f"model not found: {self.path}")
        t0 = time.perf_counter()
        self.session = make_session(self.path, threads, provider)
        self.load_seconds = time.perf_counter() - t0
        self.inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        names = {i.name for i in self.inputs}
        if "input_ids" not in names:
            raise EvalError(f"{self.path}: no input named input_ids (inputs: {sorted(names)})")
        unknown = names - {"input_ids", "attention_mask", "position_ids"}
        unknown = {n for n in unknown if not n.startswith("past_key_values")}
        if unknown:
            raise EvalError(f"{self.path}: cannot feed inputs {sorted(unknown)}")
        self.logits_name = "logits" if "logits" in outputs else outputs[0]
        self._present = {o.name: o.shape for o in self.session.get_outputs()}
        self._head_size = None

    def _past_dim(self, name: str, axis: int, dim, batch: int, past: int = 0) -> int:
        if isinstance(dim, int):
            return dim
        label = (dim or "").lower()
        if "batch" in label or (not label and axis == 0):
            return batch
        if "past" in label or "seq" in label or (not label and axis == 2):
            return past  # 0 for evaluation: the whole window is the prompt
        # A symbolic head-size dim ("kv_cache_dim" in genai exports): prefer a static
        # dim of the matching present.* output, then files beside the model.
        present = name.replace("past_key_values", "present")
        shape = self._present.get(present)
        if shape and axis < len(shape) and isinstance(shape[axis], int):
            return shape[axis]
        if self._head_size is None:
            self._head_size = _head_size_hint(self.path)
        if self._head_size is None:
            raise EvalError(f"{self.path}: cannot resolve dim {dim!r} of input {name}")
        return self._head_size

    def feeds(self, ids: np.ndarray, past: int = 0) -> dict[str, np.ndarray]:
        """Feeds for ids after `past` cached positions (zeros: enough for timing a decode step)."""
        batch, length = ids.shape
        feeds = {}
        for inp in self.inputs:
            dtype = _np_type(inp.type)
            if inp.name == "input_ids":
                feeds[inp.name] = ids.astype(dtype)
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones((batch, past + length), dtype)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.broadcast_to(np.arange(past, past + length, dtype=dtype), (batch, length)).copy()
            else:  # past_key_values.*
                shape = [self._past_dim(inp.name, a, d, batch, past) for a, d in enumerate(inp.shape)]
                feeds[inp.name] = np.zeros(shape, dtype)
        return feeds

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[batch, seq] token ids -> [batch, seq, vocab] float32 logits."""
        out = self.session.run([self.logits_name], self.feeds(np.asarray(ids)))[0]
        return out if out.dtype == np.float32 else out.astype(np.float32)


# --------------------------------------------------------------------------- text


@contextlib.contextmanager
def with_outputs(model_path: Path, values: list[str], threads: int | None = None):
    """An OrtLM of the model with `values` (intermediate activations) added as graph outputs.

    ORT refuses external data outside the model's folder (symlinks resolved): the probe lives in a
    temporary folder beside the model, its other files hard-linked (same file system, nothing copied).
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in proto.graph.output}
    for name in values:
        if name not in known:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix=".probe-", dir=model_path.parent) as tmp:
        for f in model_path.parent.iterdir():
            if f.is_file() and f != model_path:
                os.link(f, Path(tmp) / f.name)
        probe = Path(tmp) / model_path.name
        onnx.save(proto, str(probe))
        yield OrtLM(probe, threads)


def load_text(text_file: str | os.PathLike | None = None, novel: str = "prideprejudice",
              data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> str:
    """The evaluation text: a given file (whitespace collapsed) or a cached novel."""
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise EvalError(f"text file not found: {path}")
        return janeausten.collapse_whitespace([path.read_text(encoding="utf-8")])
    return janeausten.load_novel(novel, data_dir)


def make_windows(text: str, windows: int, tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER,
                 window: int = WINDOW) -> np.ndarray:
    """Tokenize once; first `windows` non-overlapping windows of BOS + (window-1) tokens."""
    from transformers import AutoTokenizer

    if windows < 1:
        raise EvalError("--windows must be at least 1")
    if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise EvalError(f"no tokenizer in {tokenizer_dir} (build the model with its tools/build_*.py)")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.bos_token_id is None:
        raise EvalError(f"tokenizer in {tokenizer_dir} has no BOS token")
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    body = window - 1
    if len(ids) < windows * body:
        raise EvalError(f"text has {len(ids)} tokens, {windows} windows need {windows * body}")
    out = np.empty((windows, window), np.int64)
    out[:, 0] = tok.bos_token_id
    out[:, 1:] = ids[: windows * body].reshape(windows, body)
    return out


# --------------------------------------------------------------------------- metrics


# Precision: logits stay float32; exp runs in float32 after subtracting the row
# max (values in (0, 1], SIMD-fast) and every sum accumulates in float64. KL is
# taken as sum_i p_i (a_i - b_i) - (lse_a - lse_b), which needs one exp pass per
# model and no log-prob tensors. Checked against an all-float64 log-softmax on
# real logits: NLL agrees to ~3e-9 per token, KL to ~3e-10 absolute, at 1/4 the time.


def _row_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exp(x - max) float32, sum of it float64, logsumexp float64) per row."""
    m = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=-1, dtype=np.float64)
    return e, s, m[:, 0].astype(np.float64) + np.log(s)


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of next-token NLL; logits[i] predicts targets[i]."""
    total = 0.0
    for s in range(0, len(targets), ROW_CHUNK):
        x, t = logits[s : s + ROW_CHUNK], targets[s : s + ROW_CHUNK]
        _, _, lse = _row_stats(x)
        total += float((lse - x[np.arange(len(x)), t]).sum())
    return total


def compare(ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> tuple[float, float, int]:
    """(sum NLL of cand, sum KL(ref || cand), count of top-1 matches) over rows."""
    nll = kl = 0.0
    top1 = 0
    for s in range(0, len(targets), ROW_CHUNK):
        a, b, t = ref[s : s + ROW_CHUNK], cand[s : s + ROW_CHUNK], targets[s : s + ROW_CHUNK]
        ea, sa, lse_a = _row_stats(a)
        _, _, lse_b = _row_stats(b)
        nll += float((lse_b - b[np.arange(len(b)), t]).sum())
        expected_diff = (ea * (a - b)).sum(axis=-1, dtype=np.float64) / sa  # E_p[a - b]
        kl += float((expected_diff - (lse_a - lse_b)).sum())
        top1 += int((a.argmax(-1) == b.argmax(-1)).sum())
    return nll, kl, top1


# --------------------------------------------------------------------------- evaluation


def evaluate(reference: str, candidates: list[str], windows: int = 16, *,
             text: str | None = None, tokenizer_dir: str | os.PathLike = DEFAULT_TOKENIZER,
             window: int = WINDOW, threads: int | None = None, progress: bool = True) -> dict:
    """Run the reference and each candidate over the same windows, one window at a time.

    Returns {"windows", "window_tokens", "tokens_evaluated", "reference": {...},
    "candidates": [{...}]}: per model path, ppl, nll, seconds (inference only),
    load_seconds, tokens; candidates also kl and top1. Metrics cover the
    window-1 next-token positions of each window (all predictions that have a target).
    """
    from tqdm import tqdm

    if text is None:
        text = load_text()
    batches = make_windows(text, windows, tokenizer_dir, window)
    ref = OrtLM(reference, threads)
    cands = [OrtLM(c, threads) for c in candidates]

    n_pred = window - 1
    stats = [{"nll": 0.0, "kl": 0.0, "top1": 0, "seconds": 0.0} for _ in [ref, *cands]]
    for ids in tqdm(batches, desc="windows", unit="win", disable=not progress, file=sys.stderr):
        targets = ids[1:]
        t0 = time.perf_counter()
        ref_logits = ref.logits(ids[None])[0, :n_pred]  # one window's logits live at a time
        stats[0]["seconds"] += time.perf_counter() - t0
        stats[0]["nll"] += nll_sum(ref_logits, targets)
        for st, cand in zip(stats[1:], cands):
            t0 = time.perf_counter()
            cand_logits = cand.logits(ids[None])[0, :n_pred]
            st["seconds"] += time.perf_counter() - t0
            if cand_logits.shape != ref_logits.shape:
                raise EvalError(f"{cand.path}: logits {cand_logits.shape} vs reference {ref_logits.shape}")
            nll, kl, top1 = compare(ref_logits, cand_logits, targets)
            st["nll"] += nll
            st["kl"] += kl
            st["top1"] += top1
            del cand_logits
        del ref_logits

    tokens = len(batches) * n_pred

    def summary(model: OrtLM, st: dict, is_ref: bool) -> dict:
        row = {
            "path": str(model.path),
            "ppl": math.exp(st["nll"] / tokens),
            "nll": st["nll"] / tokens,
            "tokens": tokens,
            "seconds": st["seconds"],
            "tokens_per_second": len(batches) * window / st["seconds"] if st["seconds"] else None,
            "load_seconds": model.load_seconds,
        }
        if not is_ref:
            row["kl"] = st["kl"] / tokens
            row["top1"] = st["top1"] / tokens
        return row

    return {
        "windows": len(batches),
        "window_tokens": window,
        "tokens_evaluated": tokens,
        "reference": summary(ref, stats[0], True),
        "candidates": [summary(m, s, False) for m, s in zip(cands, stats[1:])],
    }


def format_table(result: dict) -> str:
    rows = [("model", "PPL", "KL", "top-1", "seconds")]
    ref = result["reference"]
    rows.append((f"{ref['path']} (reference)", f"{ref['ppl']:.4f}", "-", "-", f"{ref['seconds']:.1f}"))
    for c in result["candidates"]:
        rows.append((c["path"], f"{c['ppl']:.4f}", f"{c['kl']:.3e}", f"{c['top1']:.4f}", f"{c['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{result['windows']} windows x {result['window_tokens']} tokens, "
                 f"{result['tokens_evaluated']} predictions per model")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Perplexity, KL(reference || candidate) and top-1 agreement of ONNX models "
        "through ONNX Runtime (CPU, MatMulNBits accuracy level 0) on Jane Austen.",
    )
    parser.add_argument("candidates", nargs="*",
                        help="candidate ONNX models to compare with the reference (any export style)")
    parser.add_argument("--model", default=realmodel.DEFAULT_MODEL, choices=list(realmodel.MODELS),
                        help="real model whose fp32 export and tokenizer are the defaults of --reference "
                        f"and --tokenizer (default: {realmodel.DEFAULT_MODEL})")
    parser.add_argument("--reference", default=None,
                        help="reference ONNX model (default: the model's dynamo export, "
                        f"e.g. {DEFAULT_REFERENCE.relative_to(REPO)})")
    parser.add_argument("--windows", type=int, default=16,
                        help="number of leading non-overlapping windows of BOS + 511 tokens (default: 16)")
    parser.add_argument("--tokenizer", default=None,
                        help="directory with the model's tokenizer (default: the model's hf/, "
                        f"e.g. {DEFAULT_TOKENIZER.relative_to(REPO)})")
    parser.add_argument("--text-file", default=None,
                        help="evaluate on this UTF-8 text file instead of a Jane Austen novel")
    parser.add_argument("--novel", default="prideprejudice", choices=janeausten.NOVELS,
                        help="Jane Austen novel to use when no --text-file is given (default: prideprejudice)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                        help="cache directory for the novels (default: data/ in the repository)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads (default: ORT's choice, all cores)")
    parser.add_argument("--json", default=None, help="also write the full results as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    reference, tokenizer = model_paths(args.model)
    args.reference = args.reference or str(reference)
    args.tokenizer = args.tokenizer or str(tokenizer)
    if args.windows < 1:
        parser.error("--windows must be at least 1")
    for path in [args.reference, *args.candidates]:
        if not Path(path).is_file():
            print(f"error: model not found: {path}", file=sys.stderr)
            return 2
    try:
        text = load_text(args.text_file, args.novel, args.data_dir)
        result = evaluate(args.reference, args.candidates, args.windows, text=text,
                          tokenizer_dir=args.tokenizer, threads=args.threads, progress=not args.quiet)
    except (EvalError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # ORT failures (bad graph, wrong shapes) as one line
        print(f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
              file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
