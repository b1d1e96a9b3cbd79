#!/usr/bin/env python3
"""A model on paper of `--ray` runs of 70B and 405B models on N nodes, from measured times.

    python tools/bench_large.py --shape gemma2-2b --runs cafeq,cafeq-ray --json bench.json
    python tools/research/ray_paper_model.py bench.json          # prints the markdown for BENCHMARKS.md

Inputs, all measured: from the Ray run of the 2B shape on this machine (bench.json): a layer's task
time, the driver's statistics pass and its writing per layer; from BENCHMARKS.md: the embedding's
statistics on the 2B shape (~55 s here) and a 9B-shape layer on one H100 (~22 s, `--device cuda`).
They are scaled to the target shapes by what each step does:

- a layer's task by its parameter count (measured on this CPU: the 9B layer took 2.7x the 2B one for
  2.5x the parameters); the GPTQ updates grow like K^2 N, so the report also gives that bound;
- the statistics pass by its float64 products (W^T C W over the hidden size, C W for gate and up);
- the embedding's statistics by hidden^2 (65536 sampled rows), the writing by the output's bytes.

The driver does the statistics pass and the writing in one thread, so a run takes about
    T(N) = embedding + max(L t_layer / (N s), L (t_stats + t_write)) + t_layer
with s tasks per node; past N* = t_layer / (s (t_stats + t_write)) more nodes do not help.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from make_synthetic import SHAPES, Shape  # noqa: E402

TARGETS = {
    "Llama 3 70B": Shape(128256, 8192, 28672, 80, 64, 8, 128),
    "Llama 3.1 405B": Shape(128256, 16384, 53248, 126, 128, 8, 128),
}
EMBEDDING_2B_SECONDS = 55.0  # BENCHMARKS.md, 2B shape on this machine: the statistics from the embedding
GPU_9B_LAYER_SECONDS = 22.0  # BENCHMARKS.md, one H100, 9B shape, --device cuda
GPU_FP64_FLOPS = 20e12  # an H100's float64 at about a third of its peak: an assumption, not a measurement
BITS_PER_WEIGHT = 4.5  # int4, block 32, fp16 scales
NODES = (1, 2, 4, 8, 16, 32, 64, 128)


def layer_params(s: Shape) -> int:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return s.hidden * (2 * q + 2 * kv) + 3 * s.hidden * s.intermediate


def layer_k2n(s: Shape) -> float:
    """Sum of K^2 N over a layer's linears: how GPTQ's updates grow."""
    q, kv, h, f = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    return h * h * (q + 2 * kv) + q * q * h + 2 * h * h * f + f * f * h


def statistics_flops(s: Shape) -> float:
    """float64 multiply-adds x2 of the statistics pass per layer: v and o moved through C, gate and up."""
    q, kv, h, f = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    return 2 * (h * h * kv + h * kv * kv + q * q * h + q * h * h + 2 * h * h * f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("measured", type=Path, help="the --json of `bench_large.py --runs cafeq,cafeq-ray` on the 2B shape")
    args = parser.parse_args(argv)
    data = json.loads(args.measured.read_text())
    ray = next(r for r in data["rows"] if r["kind"] == "cafeq-ray")["distributed"]
    source = SHAPES[data["meta"]["shape"]]
    layers = [u for u in ray["units"] if u["unit"].startswith("layer")]
    t_task = sum(u["seconds"] for u in layers) / len(layers)  # one thread, beside the other task
    t_stats = ray["driver_statistics_seconds"] / len(layers)
    t_write = ray["driver_apply_seconds"] / len(layers)
    write_rate = layer_params(source) * BITS_PER_WEIGHT / 8 / max(t_write, 1e-9)
    stats_rate = statistics_flops(source) / max(t_stats, 1e-9)
    gpu_source = SHAPES["gemma2-9b"]

    print(f"Measured on the 2B shape ({data['meta']['machine']}, {data['meta']['date']}): a layer's task {t_task:.1f} s "
          f"(1 thread, 2 tasks at once); the driver's statistics pass {t_stats:.2f} s per layer "
          f"({stats_rate / 1e9:.0f} GFLOP/s float64, sharing the cores with the tasks), its writing {t_write:.2f} s per layer "
          f"({write_rate / 2**20:.0f} MiB/s).\n")  # fmt: skip
    rows = []
    for name, shape in TARGETS.items():
        p_ratio = layer_params(shape) / layer_params(source)
        k_ratio = layer_k2n(shape) / layer_k2n(source)
        emb = EMBEDDING_2B_SECONDS * (shape.hidden / source.hidden) ** 2
        write = layer_params(shape) * BITS_PER_WEIGHT / 8 / write_rate
        stats_cpu = statistics_flops(shape) / stats_rate
        stats_gpu = statistics_flops(shape) / GPU_FP64_FLOPS
        gpu_layer = GPU_9B_LAYER_SECONDS * layer_params(shape) / layer_params(gpu_source)
        gpu_k = GPU_9B_LAYER_SECONDS * layer_k2n(shape) / layer_k2n(gpu_source)
        for kind, t_layer, t_hi, slots, t_stats_x in (
            ("CPU nodes like this one (2 cores, 2 one-thread tasks); CPU driver", t_task * p_ratio, t_task * k_ratio, 2, stats_cpu),
            ("one H100 per node, one task; driver with a GPU (`--device cuda`)", gpu_layer, gpu_k, 1, stats_gpu),
        ):
            driver = t_stats_x + write
            times = [emb + max(shape.layers * t_layer / (n * slots), shape.layers * driver) + t_layer for n in NODES]
            rows.append((name, kind, t_layer, t_hi, t_stats_x, write, emb, times, t_layer / (slots * driver)))
    print("| model | nodes | a layer's task (params-scaled; K^2 N bound) | driver per layer: statistics + writing | "
          + " | ".join(f"N={n}" for n in NODES) + " | stops scaling at |")
    print("|---|---|---:|---:|" + "---:|" * len(NODES) + "---:|")
    for name, kind, t_layer, t_hi, st, wr, emb, times, n_star in rows:
        print(f"| {name} | {kind} | {_t(t_layer)} ({_t(t_hi)}) | {st:.1f} s + {wr:.1f} s | "
              + " | ".join(_t(t) for t in times) + f" | N ≈ {n_star:.0f} |")  # fmt: skip
    print(f"\nThe embedding's statistics ({_t(rows[0][6])} for 70B, {_t(rows[2][6])} for 405B, on this CPU) come first; "
          f"the GPU driver's statistics assume {GPU_FP64_FLOPS / 1e12:.0f} TFLOP/s of float64 (not measured).")  # fmt: skip
    return 0


def _t(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
