#!/usr/bin/env python3
"""Which part of the method does what: the paper's ablation rows on one real model, in one run.

Every row is the `dfq-onnx optimize` command a user would run, with the default recipe changed only
in the `[method]` keys the row names; every output is evaluated through ONNX Runtime on the same
windows of text (tools/eval_quality.py): KL to the fp32 model, perplexity, top-1 agreement, and the
wall seconds of the quantize command.

    python tools/ablation.py                       # the four settings, Pride and Prejudice, 16 windows
    python tools/ablation.py --settings 2:32:asym --rows rtn,full --novel persuasion --windows 8

The table replaces the block between `<!-- ablation:begin -->` and `<!-- ablation:end -->` in
BENCHMARKS.md (or --benchmarks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import compare_peers  # noqa: E402  (settings, section writer)
import eval_quality  # noqa: E402
import realmodel  # noqa: E402

DEFAULT_RECIPE = REPO / "passes" / "recipes" / "cafeq-int4-cuda.toml"
LEARNED = {"learned_vo_steps": "100", "learned_diagonal_steps": "100", "learned_online_steps": "100"}
NO_TRANSFORMS = {"diagonal": "false", "qk_transform": "false", "vo_transform": "false", "online": "[]"}

# (key, label, how the command differs from the default: a method name, a built-in recipe, or [method] keys)
ROWS = [
    ("rtn", "round-to-nearest (ORT DEFAULT's bytes)", {"method": "rtn"}),
    ("random", "random rotation (`--recipe random-rotation`, seed 0)", {"recipe": "random-rotation"}),
    ("searched", "searched transforms only (`gptq = false`)", {"keys": {"gptq": "false"}}),
    ("learned", "learned transforms only (`gptq = false`, the three learners at 100 steps)",
     {"keys": {"gptq": "false", **LEARNED}}),
    ("gptq", "GPTQ only (no diagonal, Q/K, V/O or online transform)", {"keys": NO_TRANSFORMS}),
    ("undamped", "full method, GPTQ damped by 0.01 (the default until 2026-12-03)", {"keys": {"gptq_damp": "0.01"}}),
    ("uniform", "full method, uniform token prior (the default until 2026-12-04)", {"keys": {"token_prior": '"uniform"'}}),
    ("full", "**full method (the default recipe)**", {}),
    ("full-learned", "full method + the three learners at 100 steps", {"keys": LEARNED}),
]


def recipe_with(keys: dict[str, str], path: Path) -> Path:
    """The default recipe with `keys` set in its [method] table (which states only what differs from
    the method's defaults, so each key is added or replaced)."""
    import dataclasses
    import tomllib

    from dfq_onnx.config import MethodConfig

    known = {f.name for f in dataclasses.fields(MethodConfig)}
    if unknown := [k for k in keys if k not in known]:
        raise SystemExit(f"error: the method has no setting {', '.join(map(repr, unknown))} (MethodConfig)")
    text = DEFAULT_RECIPE.read_text()
    if "method" in tomllib.loads(text):
        raise SystemExit(f"error: {DEFAULT_RECIPE.name} has a [method] table; this tool expects the method's defaults")
    lines = [f"{key} = {value}" for key, value in keys.items()]
    path.write_text(text + ("\n[method]\n" + "\n".join(lines) + "\n" if lines else ""))
    return path


def command(model: Path, out: Path, setting, change: dict, work: Path, key: str) -> list[str]:
    cmd = ["dfq-onnx", "optimize", str(model), "-o", str(out), "--bits", str(setting.bits), "--block-size",
           str(setting.block), "--symmetric" if setting.symmetric else "--asymmetric", "--verify", "none", "--quiet"]
    if "method" in change:
        return cmd + ["--method", change["method"]]
    if "recipe" in change:
        return cmd + ["--recipe", change["recipe"]]
    if change.get("keys"):
        return cmd + ["--recipe", str(recipe_with(change["keys"], work / f"{key}.toml"))]
    return cmd


def run_setting(setting, rows, model: Path, work: Path, windows: int, text: str, tokenizer: Path) -> list[dict]:
    results = []
    for key, label, change in rows:
        out = work / f"{key}-{setting.bits}b-g{setting.block}-{'sym' if setting.symmetric else 'asym'}.onnx"
        print(f"[{setting.label}] {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(command(model, out, setting, change, work, key), capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        error = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
        results.append({"key": key, "label": label, "setting": setting.label, "path": str(out), "seconds": seconds, "error": error})
    ok = [r for r in results if not r["error"]]
    print(f"[{setting.label}] evaluating {len(ok)} models on {windows} windows ...", file=sys.stderr, flush=True)
    scores = eval_quality.evaluate(str(model), [r["path"] for r in ok], windows, text=text, tokenizer_dir=tokenizer, progress=False)
    by_path = {c["path"]: c for c in scores["candidates"]}
    for r in ok:
        r.update({k: by_path[r["path"]][k] for k in ("ppl", "kl", "top1")})
    for r in results:  # the disk stays small: a setting's models are not needed once evaluated
        for p in work.glob(Path(r["path"]).name + "*"):
            p.unlink()
        report = Path(r["path"]).with_suffix(".report.json")
        report.unlink(missing_ok=True)
    return results


def render(results: list[dict], meta: dict) -> str:
    lines = [
        "<!-- ablation:begin -->",
        f"Model: {meta['model']} (fp32 ONNX, lm_head kept in float). Text: {meta['novel']}, {meta['windows']} windows of "
        "BOS + 511 tokens, ONNX Runtime CPU. Every row is `dfq-onnx optimize MODEL -o X.onnx --bits B --block-size G "
        "--symmetric|--asymmetric --verify none` with the default recipe changed only as the row says.",
        f"Machine: {meta['machine']}. Date: {meta['date']}. Code: {meta['commit']}. Command: `{meta['command']}`",
        "",
        "| setting | row | KL to fp32 | PPL | top-1 | quantize s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["error"]:
            lines.append(f"| {r['setting']} | {r['label']} | failed: {r['error']} | | | {r['seconds']:.1f} |")
        else:
            lines.append(f"| {r['setting']} | {r['label']} | {r['kl']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | {r['seconds']:.1f} |")
    lines.append("<!-- ablation:end -->")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=realmodel.DEFAULT_MODEL, choices=list(realmodel.MODELS), help="real model (default: %(default)s)")
    parser.add_argument("--settings", default=None, help="subset, e.g. '4:32:sym,2:32:asym' (default: the peer table's four)")
    parser.add_argument("--rows", default=None, help=f"subset of the rows ({', '.join(k for k, _, _ in ROWS)}; default: all)")
    parser.add_argument("--windows", type=int, default=16, help="text windows of BOS + 511 tokens (default: 16)")
    parser.add_argument("--novel", default="prideprejudice", help="the text (default: prideprejudice, the reported one)")
    parser.add_argument("--work", default=None, help="directory for the quantized models (default: a temporary one)")
    parser.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"), help="file whose ablation block is replaced")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--include", default=None, metavar="JSON",
                        help="an earlier run's --json, merged into the table (a row measured again in this run replaces it)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, tokenizer = eval_quality.model_paths(args.model)
    if not model.is_file():
        print(f"error: {model} not found; build it with python {realmodel.script(args.model)}", file=sys.stderr)
        return 2
    settings = compare_peers.SETTINGS
    if args.settings:
        settings = [compare_peers.Setting(int(b), int(g), s == "sym") for b, g, s in (x.split(":") for x in args.settings.split(","))]
    known = {k for k, _, _ in ROWS}
    wanted = args.rows.split(",") if args.rows else [k for k, _, _ in ROWS]
    if set(wanted) - known:
        print(f"error: unknown rows {sorted(set(wanted) - known)}: choose from {', '.join(known)}", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r[0] in wanted]
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="ablation_", dir=REPO / "models"))
    work.mkdir(parents=True, exist_ok=True)
    text = eval_quality.load_text(novel=args.novel)
    results = json.loads(Path(args.include).read_text()) if args.include else []
    for setting in settings:
        results += run_setting(setting, rows, model, work, args.windows, text, tokenizer)
        if args.json:  # kept as it grows: a later failure does not lose the settings already measured
            Path(args.json).write_text(json.dumps(results, indent=2))
    options = [f"--{k} {v}" for k, v in (("model", args.model if args.model != realmodel.DEFAULT_MODEL else None),
                                          ("settings", args.settings), ("rows", args.rows),
                                          ("windows", args.windows if args.windows != 16 else None),
                                          ("novel", args.novel if args.novel != "prideprejudice" else None),
                                          ("include", args.include)) if v]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "model": model.relative_to(REPO) if model.is_relative_to(REPO) else model,
        "novel": args.novel, "windows": args.windows, "commit": commit or "unknown",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python tools/ablation.py", *options]),
    }
    latest = {(r["setting"], r["key"]): r for r in results}  # a row measured again replaces the included one
    results = list(latest.values())
    order = list(dict.fromkeys(r["setting"] for r in results))  # settings as first measured, rows as ROWS lists them
    rank = {k: i for i, (k, _, _) in enumerate(ROWS)}
    results.sort(key=lambda r: (order.index(r["setting"]), rank[r["key"]]))
    table = render(results, meta)
    print(table)
    compare_peers.write_section(Path(args.benchmarks), "<!-- ablation:begin -->", "<!-- ablation:end -->",
                                "Ablation: which part of the method does what", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
