"""Memory and speed on a large synthetic model: dfq-onnx against ONNX Runtime's quantizer, in one run.

    python tools/bench_large.py --shape gemma2-2b                 # build the model if absent, run all three
    python tools/bench_large.py --shape gemma2-9b --runs cafeq    # only the method

Each quantizer runs in its own process under /usr/bin/time, one after the other on the same
model (4-bit, block 32, symmetric, lm_head kept): ORT's MatMulNBitsQuantizer (DEFAULT, which
loads the model into memory as its command line does), dfq-onnx round-to-nearest and dfq-onnx's
method. Wall time and peak resident memory are measured; the table goes into BENCHMARKS.md.
dfq-onnx runs with --verify none: loading a model this size in ONNX Runtime to check it
would measure ORT's memory, not the quantizer's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import compare_peers  # noqa: E402
import make_synthetic  # noqa: E402

RUNS = ("ort-default", "rtn", "cafeq", "cafeq-1thread", "cafeq-ray")
# the method with one torch thread, and spread over a private Ray cluster of this machine's cores (one
# task per core, one thread each): the two write the same bytes (a run's bytes depend on its thread count)
RAY_FLAGS = {"cafeq-1thread": ["--threads", "1"], "cafeq-ray": ["--threads", "1", "--ray", "local"]}
BEGIN, END = "<!-- bench_large:{key}:begin -->", "<!-- bench_large:{key}:end -->"  # one table per shape and set of runs


def weight_stats(model: Path) -> tuple[int, int]:
    """(parameters, bytes) of the model's float weights, from the graph alone."""
    import numpy as np
    import onnx_ir as ir

    m = ir.load(model)
    params = nbytes = 0
    for value in m.graph.initializers.values():
        t = value.const_value
        if t is not None and t.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT):
            params += int(np.prod(t.shape.numpy())) if len(t.shape) else 1
            nbytes += t.nbytes
    return params, nbytes


def run_one(kind: str, model: Path, work: Path, lm_head: str, device: str) -> dict:
    out = work / f"{kind}.onnx"
    if kind == "ort-default":
        cmd = [sys.executable, "-c", compare_peers.ORT_SCRIPT, str(model), str(out), "default", "4", "32", "1", lm_head]
    else:
        method = "rtn" if kind == "rtn" else "cafeq"
        cmd = [sys.executable, "-m", "dfq_onnx.front.cli", "optimize", str(model), "-o", str(out), "--bits", "4",
               "--block-size", "32", "--symmetric", "--method", method, "--verify", "none", "--quiet", "--device", device,
               *RAY_FLAGS.get(kind, [])]  # fmt: skip
    print(f"running {kind} ...", file=sys.stderr, flush=True)
    wall, rss, error = compare_peers.run_measured(cmd)
    size = sum(p.stat().st_size for p in work.glob(f"{kind}.onnx*")) if not error else 0
    report = work / f"{kind}.report.json"
    distributed = json.loads(report.read_text()).get("distributed") if report.is_file() else None
    digest = _digest(work / f"{kind}.onnx.data") if not error and kind in RAY_FLAGS else None
    for p in work.glob(f"{kind}.*"):
        p.unlink()
    print(f"  {kind}: {wall:.0f}s, peak RSS {rss or 0:.0f} MiB{', FAILED: ' + error if error else ''}", file=sys.stderr)
    return {"kind": kind, "seconds": wall, "peak_rss_mib": rss, "error": error, "output_bytes": size, "distributed": distributed, "data_sha256": digest}


def _digest(path: Path) -> str | None:
    import hashlib

    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def render(rows: list[dict], meta: dict) -> str:
    ort = next((r for r in rows if r["kind"] == "ort-default" and not r["error"]), None)
    names = {
        "ort-default": "ORT MatMulNBitsQuantizer DEFAULT",
        "rtn": "dfq-onnx rtn",
        "cafeq": "dfq-onnx method (cafeq)",
        "cafeq-1thread": "dfq-onnx method, --threads 1",
        "cafeq-ray": "dfq-onnx method, --threads 1 --ray local",
    }
    lines = [
        BEGIN.format(key=meta["key"]),
        f"Model: synthetic {meta['shape']} ({meta['layers']} layers, dynamo export graph), "
        f"{meta['params'] / 1e9:.2f}B parameters, {meta['weight_bytes'] / 2**30:.2f} GiB of fp16 weights. "
        "Setting: int4, block 32, symmetric, MatMulNBits, lm_head/embedding kept.",
        f"Machine: {meta['machine']}. Date: {meta['date']}. Command: `{meta['command']}`.",
        "",
        "| quantizer | wall time | peak RSS | RSS / weight bytes | seconds per B params | vs ORT time | vs ORT RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {names[r['kind']]} | failed: {r['error']} | | | | | |")
            continue
        rss = r["peak_rss_mib"] or 0
        rel_t = f"{r['seconds'] / ort['seconds']:.2f}x" if ort else "-"
        rel_m = f"{rss / ort['peak_rss_mib']:.2f}x" if ort and ort["peak_rss_mib"] else "-"
        lines.append(
            f"| {names[r['kind']]} | {r['seconds']:.0f} s | {rss / 1024:.2f} GiB | {rss * 2**20 / meta['weight_bytes']:.3f} | "
            f"{r['seconds'] / (meta['params'] / 1e9):.0f} | {rel_t} | {rel_m} |"
        )
    lines += _ray_lines(rows, meta)
    lines.append(END.format(key=meta["key"]))
    return "\n".join(lines)


def _ray_lines(rows: list[dict], meta: dict) -> list[str]:
    """For a Ray run: its time against the single-process runs, the driver's share, the bytes check."""
    by = {r["kind"]: r for r in rows if not r["error"]}
    ray = by.get("cafeq-ray")
    if not ray or not ray["distributed"]:
        return []
    run = ray["distributed"]
    layers = [u for u in run["units"] if u["unit"].startswith("layer")]
    lines = ["", f"Ray run: {len(run['units'])} units on {len(run['nodes'])} node(s), {run['threads_per_task']} thread each; "
             f"driver peak RSS {run['driver_peak_rss_mib'] / 1024:.2f} GiB (workers at most {max(u['worker_peak_rss_mib'] for u in run['units']) / 1024:.2f} GiB each); "
             f"a layer's task {sum(u['seconds'] for u in layers) / max(len(layers), 1):.1f} s on average; the driver's statistics pass "
             f"{run['driver_statistics_seconds']:.0f} s and writing {run['driver_apply_seconds']:.0f} s in all."]  # fmt: skip
    for base in ("cafeq", "cafeq-1thread"):
        if base in by:
            lines.append(f"Wall time of the single-process run `{names_of(base)}` / the Ray run: **{by[base]['seconds'] / ray['seconds']:.2f}x**.")
    if "cafeq-1thread" in by:
        same = by["cafeq-1thread"]["data_sha256"] == ray["data_sha256"]
        lines.append(f"Output data of the Ray run and of the local `--threads 1` run: {'identical' if same else 'DIFFERENT'} (sha256).")
    return lines


def names_of(kind: str) -> str:
    return " ".join(RAY_FLAGS.get(kind, [])) or "default threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(make_synthetic.SHAPES), default="gemma2-2b", help="[gemma2-2b]")
    parser.add_argument("--model", type=Path, default=None, help="use this model (default: models/synthetic/<shape>/model.onnx, built if absent)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--device", default="cpu", help="torch device for dfq-onnx [cpu]")
    parser.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md", help="file whose table is replaced")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    model = args.model or REPO / "models" / "synthetic" / args.shape / "model.onnx"
    if not model.exists():
        make_synthetic.main(["--shape", args.shape, "-o", str(model)])
    from dfq_onnx.run.pipeline import inspect

    sites = inspect(model)
    params, weight_bytes = weight_stats(model)
    work = model.parent / "bench-out"
    work.mkdir(exist_ok=True)
    rows = [run_one(kind, model, work, sites.lm_head or "", args.device) for kind in runs]
    work.rmdir()
    meta = {
        "shape": args.shape,
        "key": f"{args.shape}:{'+'.join(runs)}",
        "layers": len(sites.layers()),
        "params": params,
        "weight_bytes": weight_bytes,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {compare_peers._memory()}"
        + (f", torch device {args.device}" if args.device != "cpu" else ""),
        "date": datetime.date.today().isoformat(),
        "command": f"python tools/bench_large.py --shape {args.shape} --runs {','.join(runs)}"
        + (f" --device {args.device}" if args.device != "cpu" else ""),
    }
    table = render(rows, meta)
    print(table)
    compare_peers.write_section(
        args.benchmarks,
        BEGIN.format(key=meta["key"]),
        END.format(key=meta["key"]),
        f"Large model: memory and speed on synthetic {args.shape} ({', '.join(runs)})",
        table,
    )
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
