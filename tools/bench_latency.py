#!/usr/bin/env python3
"""Side-by-side ONNX Runtime latency of language models: prompt (prefill) and, for exports with a
KV cache, one decode step after a cached context.

Models are timed interleaved (A, B, C, A, B, C, ...) so that machine noise hits them alike; the table
gives the median per model and its ratio to the first model (the baseline), e.g.

    python tools/bench_latency.py plain.onnx rotated.onnx --prompt 128 --runs 20
    python tools/bench_latency.py fp16.onnx ours.onnx ort.onnx --provider cuda --decode-past 512
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402  (sibling module: generic feeds by input name)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def has_cache(lm: eval_quality.OrtLM) -> bool:
    return any(i.name.startswith("past_key_values") for i in lm.inputs)


def vocab_size(lm: eval_quality.OrtLM) -> int:
    """Token ids to draw from: the logits' width where the graph states it, else a small safe range."""
    out = next(o for o in lm.session.get_outputs() if o.name == lm.logits_name)
    return out.shape[-1] if isinstance(out.shape[-1], int) else 256


def time_runs(models: list[eval_quality.OrtLM], feeds: list[dict], runs: int, warmup: int) -> list[list[float]]:
    """Seconds per run for each model, runs interleaved across models."""
    for lm, f in zip(models, feeds):
        for _ in range(warmup):
            lm.session.run([lm.logits_name], f)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for i, (lm, f) in enumerate(zip(models, feeds)):
            t0 = time.perf_counter()
            lm.session.run([lm.logits_name], f)
            times[i].append(time.perf_counter() - t0)
    return times


def render(paths: list[str], results: dict[str, list[list[float]]], meta: dict) -> str:
    lines = [
        f"Machine: {meta['machine']}. Provider: {meta['provider']}. Date: {meta['date']}. Command: `{meta['command']}`",
        "",
        "| model | " + " | ".join(f"{k} ms (median)" for k in results) + " | " + " | ".join(f"{k} ratio" for k in results) + " |",
        "|---|" + "---|" * (2 * len(results)),
    ]
    for i, path in enumerate(paths):
        medians = [statistics.median(t[i]) for t in results.values()]
        ratios = [statistics.median(t[i]) / statistics.median(t[0]) for t in results.values()]
        lines.append(f"| {path} | " + " | ".join(f"{m * 1e3:.2f}" for m in medians) + " | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="ONNX models; the first is the baseline of the ratios")
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu", help="execution provider (default: cpu)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens, batch 1 (default: 128; 0: skip)")
    parser.add_argument("--decode-past", type=int, default=256, help="cached positions before the timed decode step (default: 256)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per model and mode (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    args = parser.parse_args(argv)
    try:
        models = [eval_quality.OrtLM(p, args.threads, PROVIDERS[args.provider]) for p in args.models]
    except eval_quality.EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for lm in models:
        if PROVIDERS[args.provider] not in lm.session.get_providers():
            print(f"error: {lm.path} did not get {PROVIDERS[args.provider]}; install onnxruntime-gpu for --provider cuda", file=sys.stderr)
            return 2
    rng = np.random.default_rng(0)
    vocab = min(vocab_size(lm) for lm in models)
    results: dict[str, list[list[float]]] = {}
    if args.prompt:
        ids = rng.integers(0, vocab, size=(1, args.prompt))
        results[f"prompt {args.prompt}"] = time_runs(models, [lm.feeds(ids) for lm in models], args.runs, args.warmup)
    if all(has_cache(lm) for lm in models):
        ids = rng.integers(0, vocab, size=(1, 1))
        feeds = [lm.feeds(ids, past=args.decode_past) for lm in models]
        results[f"decode @{args.decode_past}"] = time_runs(models, feeds, args.runs, args.warmup)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "provider": models[0].session.get_providers()[0],
        "date": datetime.date.today().isoformat(),
        "command": "python tools/bench_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(render(args.models, results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
