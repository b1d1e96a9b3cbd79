"""The token sequences an evaluation scores: sampled by the reference itself (no text needed), or
windows of a tokenised text."""

from __future__ import annotations

import numpy as np

from ..errors import DfqError


def generate(reference, samples: int, length: int, temperature: float, seed: int, bos: int | None, progress=None) -> np.ndarray:
    """`samples` sequences of `length` tokens the reference samples at `temperature` (0: greedy),
    all in one batch, through the graph's KV cache where it has one (else each step reruns the
    prefix). The first token is
    `bos`, or drawn uniformly from the vocabulary; numpy's default_rng(seed) draws everything."""
    rng = np.random.default_rng(seed)
    if bos is None:
        vocab = reference.logits_at(np.zeros((1, 1), np.int64), np.zeros(1)).shape[-1]
        first = rng.integers(0, vocab, size=samples)
    else:
        first = np.full(samples, bos)
    ids = np.zeros((samples, length), np.int64)
    ids[:, 0] = first
    cached = reference.cache_outputs() is not None
    past = None
    for t in range(1, length):
        if cached:  # one new token per step after the cache of the ones before
            logits, past = reference.step(ids[:, t - 1 : t], past)
            logits = logits.astype(np.float64)
        else:
            logits = reference.logits_at(ids[:, :t], np.arange(samples) * t + t - 1).astype(np.float64)
        if temperature == 0:
            ids[:, t] = logits.argmax(-1)
        else:
            z = logits / temperature
            p = np.exp(z - z.max(-1, keepdims=True))
            c = np.cumsum(p, axis=-1)
            u = rng.random(samples)[:, None] * c[:, -1:]
            ids[:, t] = np.minimum((c < u).sum(-1), logits.shape[-1] - 1)
        if progress is not None:
            progress(f"sample token {t + 1}/{length}")
    return ids


def text_windows(ids: list[int], samples: int, length: int, bos: int | None) -> np.ndarray:
    """Up to `samples` consecutive, non-overlapping windows of the text's tokens, each `length`
    tokens long: the bos token (when the model has one) and `length - 1` text tokens, else `length`
    text tokens. Fewer windows when the text is shorter; an error when it holds none."""
    step = length - 1 if bos is not None else length
    count = min(samples, len(ids) // step)
    if count == 0:
        raise DfqError(f"the text has {len(ids)} tokens, fewer than one window of {step}; give a longer text or a smaller --length")
    body = np.asarray(ids[: count * step], np.int64).reshape(count, step)
    if bos is None:
        return body
    return np.concatenate([np.full((count, 1), bos, np.int64), body], axis=1)
