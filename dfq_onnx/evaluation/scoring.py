"""One forward of the same token sequences through the reference and every candidate: KL(reference ||
candidate) per position, top-1 agreement, and each model's log-probability of the next token."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import DfqError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class Totals:
    """Sums over the scored positions of one model."""

    kl: float = 0.0
    top1: float = 0.0
    positions: int = 0
    nll: float = 0.0
    tokens: int = 0

    def summary(self) -> dict:
        return {
            "kl": self.kl / self.positions if self.positions else None,
            "top1": self.top1 / self.positions if self.positions else None,
            "ppl": math.exp(self.nll / self.tokens) if self.tokens else None,
            "positions": self.positions,
            "tokens": self.tokens,
        }


def score(models, ids: np.ndarray, compare: np.ndarray, predict: np.ndarray, totals: list[Totals], progress=None) -> list[np.ndarray]:
    """Run `ids` [batch, seq] through every model (models[0] is the reference).

    `compare` [batch, seq]: positions whose next-token distributions are compared (KL, top-1);
    `predict` [batch, seq - 1]: positions t whose log-probability of ids[t + 1] counts for perplexity.
    Adds to `totals` (one per model); returns each model's log-probabilities of the next tokens
    [batch, seq - 1] (float64)."""
    batch, seq = ids.shape
    counts = np.concatenate([predict, np.zeros((batch, 1), bool)], axis=1).reshape(-1)
    nexts = score_at(models, ids, np.arange(ids.size), compare.reshape(-1), counts, totals, progress)
    return [nxt.reshape(batch, seq)[:, :-1] for nxt in nexts]


def score_at(models, ids: np.ndarray, at: np.ndarray, compare: np.ndarray, predict: np.ndarray, totals: list[Totals], progress=None) -> list[np.ndarray]:
    """`score` at chosen positions only: `at` indexes the flattened [batch * seq] positions of `ids`
    (the head runs there alone when the model allows it); `compare` and `predict` are masks over
    `at`. Returns each model's log-probability of the token after each position of `at` (float64;
    0 where there is none: the last position of a row)."""
    flat = ids.reshape(-1)
    has_next = (at + 1) % ids.shape[1] != 0
    targets = np.where(has_next, flat[np.minimum(at + 1, flat.size - 1)], -1)
    return compare_rows(models, lambda model: model.logits_at(ids, at), targets, compare, predict, totals, progress)


def compare_rows(models, logits_of, targets: np.ndarray, compare: np.ndarray, predict: np.ndarray, totals: list[Totals], progress=None) -> list[np.ndarray]:
    """The core of `score_at`: `logits_of(model)` gives [n, vocab] rows, the same positions for every
    model; `targets` [n] the next token of each row (-1: none). Adds to `totals`; returns each
    model's log-probability of its targets (0 where there is none)."""
    rows = np.arange(len(targets))
    out = []
    ref_lp = ref_p = ref_top = None
    for i, model in enumerate(models):
        logits = logits_of(model)
        if logits.ndim != 2 or logits.shape[0] != len(targets):
            raise DfqError(f"{model.label} gives logits of shape {list(logits.shape)}; expected [batch, sequence, vocab]")
        if ref_lp is not None and logits.shape != ref_lp.shape:
            raise DfqError(
                f"candidate {model.label} gives logits over {logits.shape[-1]} tokens, the reference over "
                f"{ref_lp.shape[-1]}; compare models of the same vocabulary"
            )
        lp = log_softmax(logits)
        nxt = np.where(targets >= 0, lp[rows, np.maximum(targets, 0)], 0.0).astype(np.float64)
        if ref_lp is None:
            ref_lp, ref_p, ref_top = lp, np.exp(lp), lp.argmax(-1)
            kl, top1 = np.zeros(len(targets)), np.ones(len(targets))
        else:
            kl = (ref_p * (ref_lp - lp)).sum(-1, dtype=np.float64)
            top1 = (lp.argmax(-1) == ref_top).astype(np.float64)
        t = totals[i]
        t.kl += float(kl[compare].sum())
        t.top1 += float(top1[compare].sum())
        t.positions += int(compare.sum())
        t.nll -= float(nxt[predict].sum())
        t.tokens += int(predict.sum())
        out.append(nxt)
        if progress is not None:
            progress(model.label)
    return out


def stderr(p: float, n: int) -> float:
    """Standard error of a proportion p over n questions: sqrt(p(1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def paired_stderr(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a - b) over paired questions: sample std of the differences / sqrt(n)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
