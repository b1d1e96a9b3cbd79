#!/usr/bin/env python3
"""The paper's comparison on a real model, in one run: quality on three kinds of ground and
multiple-choice accuracy, for fp32, round-to-nearest, a random rotation, the method, ORT's HQQ and
GPTQ with data (evaluation side: only this tool reads text).

    python tools/fetch_tasks.py && python tools/shakespeare.py            # the tasks and the neutral text
    python tools/paper_table.py --model gemma3-270m --limit 100          # writes its sections of BENCHMARKS.md
    python tools/paper_table.py --model smollm2 --settings 4:32:sym --limit 0   # no tasks: the quality table only

Rows per setting (lm_head and embedding kept in float by every quantizer, as in compare_peers.py):
round-to-nearest ("Uniform", the bytes of ORT's DEFAULT), random rotation (recipe random-rotation,
seed 0), the method (its default recipe at the setting), ORT HQQ (4 bits only), and GPTQ with data:
the method's own solver under the dense E[x x^T] of 128 windows of Persuasion (tools/gap_split.py's
real-dense), the tuning text. Quality (dfq_onnx.evaluate against the fp32 model): KL on 32 x 64
tokens the fp32 model samples itself (seed 0, temperature 0.8), on 16 windows of 512 tokens of
Pride and Prejudice (the report text) and of four Shakespeare plays (neutral), and how well the
self-generated KL ranks the rows as the text does (Spearman). Tasks: the zero-shot requests in
data/tasks, the same seeded `--limit` questions per task for every row, each row's accuracy with
its standard error and the paired standard error of its difference from fp32.

Models and results are kept in --work and reused, so an interrupted run goes on where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import compare_peers  # noqa: E402
import eval_quality  # noqa: E402
import realmodel  # noqa: E402

DATA = REPO / "data"
TEXTS = {"pride": DATA / "prideprejudice.txt", "shakespeare": DATA / "shakespeare.txt"}
ROWS = ("rtn", "random", "method", "hqq", "gptq-data")
LABELS = {
    "fp32": "fp32",
    "rtn": "round-to-nearest (Uniform)",
    "random": "random rotation + RTN",
    "method": "the method (data-free)",
    "hqq": "ORT HQQ (data-free)",
    "gptq-data": "GPTQ with data (Persuasion)",
}
# Length-normalised accuracy (per character), as OLMES reports these tasks; BoolQ's two answers
# (" yes" / " no") differ in length only, so its plain accuracy.
PLAIN_ACCURACY = {"boolq"}
CALIB_WINDOWS = 128


def quantize(row: str, setting: compare_peers.Setting, model: Path, work: Path, lm_head: str, tokenizer: Path) -> dict:
    """One row's model in `work`: {"path", "seconds"} or {"error"}."""
    out = work / f"{row}-{setting.bits}b-g{setting.block}-{'sym' if setting.symmetric else 'asym'}.onnx"
    if row == "hqq" and setting.bits != 4:
        return {"error": "ORT's HQQ writes 4 bits only here"}
    flags = ["--bits", str(setting.bits), "--block-size", str(setting.block), "--symmetric" if setting.symmetric else "--asymmetric"]
    if row == "hqq":  # its own process, as compare_peers.py runs ORT's quantizers
        r = compare_peers.quantize(compare_peers.Job(setting, "ort", "hqq", False), model, work, lm_head)
        return {"error": r["error"]} if r["error"] else {"path": r["path"], "seconds": r["seconds"]}
    if row == "gptq-data":
        t0 = time.perf_counter()
        gptq_with_data(model, out, setting, tokenizer, work / "persuasion-moments.pt")
        return {"path": str(out), "seconds": time.perf_counter() - t0}
    how = {"rtn": ["--method", "rtn"], "random": ["--recipe", "random-rotation", "--seed", "0"], "method": ["--method", "cafeq"]}[row]
    cmd = [sys.executable, "-m", "dfq_onnx.front.cli", "optimize", str(model), "-o", str(out), *flags, *how,
           "--lm-head", "keep", "--verify", "none", "--quiet"]  # fmt: skip
    seconds, _, error = compare_peers.run_measured(cmd)
    return {"error": error} if error else {"path": str(out), "seconds": seconds}


def gptq_with_data(model: Path, out: Path, setting: compare_peers.Setting, tokenizer: Path, cache: Path) -> None:
    """The method's GPTQ solver, no transforms, under E[x x^T] measured on the tuning text."""
    import gap_split

    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    graph = load.load_model(model)
    sites = find_sites(graph)
    inputs = gap_split.linear_inputs(graph, sites)
    ids = eval_quality.make_windows(eval_quality.load_text(None, "persuasion"), CALIB_WINDOWS, tokenizer)
    real = gap_split.cached_real_moments(cache, model, sorted(set(inputs.values())), ids, None)
    fmt = {"bits": setting.bits, "block_size": setting.block, "symmetric": setting.symmetric}
    with gap_split.solver_with(gap_split.hessians("real-dense", real, {}, inputs)):
        gap_split.quantize(model, out, fmt)


def evaluations(limit: int, tasks: Path) -> dict[str, dict]:
    """dfq_onnx.evaluate's options per measurement."""
    out = {
        "generated": {"samples": 32, "length": 64},
        "pride": {"text": TEXTS["pride"], "samples": 16, "length": 512, "batch": 2},
        "shakespeare": {"text": TEXTS["shakespeare"], "samples": 16, "length": 512, "batch": 2},
    }
    if limit:
        out[f"tasks@{limit}"] = {"tasks": tasks, "limit": limit, "batch": 16}
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""

    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def chance(tasks: Path, limit: int, seed: int = 0) -> dict[str, float]:
    """Expected accuracy of a uniform guess on each task's subsample."""
    from dfq_onnx.evaluation.tasks import read_tasks, subsample

    return {name: float(np.mean([1 / len(q.choices) for q in subsample(qs, limit, seed)])) for name, qs in read_tasks(tasks).items()}


def quality_table(results: dict, settings, meta: dict) -> tuple[str, dict]:
    lines = [
        "| setting | quantizer | KL self-generated | KL Pride and Prejudice | KL Shakespeare | PPL P&P | PPL Shakespeare | quantize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = results["reference"]
    lines.append(f"| - | fp32 | 0 | 0 | 0 | {ref['pride']['ppl']:.2f} | {ref['shakespeare']['ppl']:.2f} | - |")
    pairs = {"pride": ([], []), "shakespeare": ([], [])}
    free = {"pride": ([], []), "shakespeare": ([], [])}  # the data-free rows only
    for s in settings:
        for row in ROWS:
            r = results["rows"].get(f"{s.label}/{row}")
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {s.label} | {LABELS[row]} | - | - | - | - | - | {r['error']} |")
                continue
            e = r["eval"]
            secs = f"{r['seconds']:.0f}" if r.get("seconds") else "-"
            lines.append(
                f"| {s.label} | {LABELS[row]} | {e['generated']['kl']:.4f} | {e['pride']['kl']:.4f} | {e['shakespeare']['kl']:.4f} "
                f"| {e['pride']['ppl']:.2f} | {e['shakespeare']['ppl']:.2f} | {secs} |"
            )
            for group in (pairs, free) if row != "gptq-data" else (pairs,):
                for text, (gen, txt) in group.items():
                    gen.append(e["generated"]["kl"])
                    txt.append(e[text]["kl"])
    rho = {f"{text}, all rows": spearman(*pair) for text, pair in pairs.items() if len(pair[0]) > 2}
    rho.update({f"{text}, data-free rows": spearman(*pair) for text, pair in free.items() if len(pair[0]) > 2})
    return "\n".join(lines), rho


SANITY = ("arc_easy", "hellaswag", "piqa")  # the tasks whose fp32 accuracy must stand clear of chance


def sanity_tasks(tasks: Path, work: Path) -> Path:
    """A task folder of SANITY alone (links to their request files in `tasks`)."""
    out = work / "sanity-tasks"
    for name in SANITY:
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in (tasks / name).iterdir():
            if not (out / name / f.name).exists():
                (out / name / f.name).symlink_to(f.resolve())
    return out


def sanity_line(reference: dict, odds: dict[str, float], n: int) -> str:
    """The fp32 model alone on the sanity tasks: length-normalised accuracy and its distance from chance in standard errors."""
    parts = []
    for name in SANITY:
        t = reference["tasks"][name]
        z = (t["acc_norm"] - odds[name]) / t["acc_norm_stderr"] if t["acc_norm_stderr"] else float("inf")
        parts.append(f"{name} {100 * t['acc_norm']:.1f}% ± {100 * t['acc_norm_stderr']:.1f} (chance {100 * odds[name]:.0f}%: {z:.1f} SE above)")
    return f"Scoring sanity check, the fp32 model alone on {n} questions per task (seeded): " + "; ".join(parts) + "."


def task_table(results: dict, settings, odds: dict[str, float], limit: int) -> str:
    key = f"tasks@{limit}"
    ref_tasks = results["reference"][key]["tasks"]
    names = sorted(ref_tasks)

    def metric(name):
        return "acc" if name.split("/")[0] in PLAIN_ACCURACY else "acc_norm"

    # near chance: the fp32 model within two standard errors of a uniform guess
    near = {n for n in names if ref_tasks[n][metric(n)] - odds[n] < 2 * ref_tasks[n][f"{'' if metric(n) == 'acc' else 'acc_norm_'}stderr"]}
    head = "| setting | quantizer | " + " | ".join(n + (" (near chance)" if n in near else "") for n in names) + " | average | average without near-chance |"
    lines = [head, "|---" * (len(names) + 4) + "|"]

    def cells(entry, base):
        out, diffs = [], []
        for n in names:
            t = entry["tasks"][n]
            m = metric(n)
            err = t["stderr"] if m == "acc" else t["acc_norm_stderr"]
            if base:
                out.append(f"{100 * t[m]:.1f} ±{100 * err:.1f}")
            else:
                d, de = t[f"{m}_diff"], t[f"{m}_diff_stderr"]
                out.append(f"{100 * t[m]:.1f} ({100 * d:+.1f} ±{100 * de:.1f})")
        for group in (names, [n for n in names if n not in near]):
            vals = [entry["tasks"][n][metric(n)] for n in group]
            out.append(f"{100 * np.mean(vals):.1f}" if vals else "-")
        return out

    lines.append("| - | fp32 | " + " | ".join(cells(results["reference"][key], True)) + " |")
    for s in settings:
        for row in ROWS:
            r = results["rows"].get(f"{s.label}/{row}")
            if r is None or "error" in r or key not in r["eval"]:
                continue
            lines.append(f"| {s.label} | {LABELS[row]} | " + " | ".join(cells(r["eval"][key], False)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=realmodel.DEFAULT_MODEL, choices=list(realmodel.MODELS))
    parser.add_argument("--settings", default="4:32:sym,3:32:asym", help="bits:block:sym|asym, comma-separated [4:32:sym,3:32:asym]")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"quantizers [{','.join(ROWS)}]")
    parser.add_argument("--limit", type=int, default=100, help="questions per task, a fixed seeded subsample; 0: no tasks [100]")
    parser.add_argument("--tasks", type=Path, default=DATA / "tasks", help="task folder [data/tasks]")
    parser.add_argument("--work", type=Path, default=None, help="models and results, kept and reused [models/paper-<model>]")
    parser.add_argument("--sanity", type=int, default=0, metavar="N",
                        help=f"also score the fp32 model alone on {', '.join(SANITY)} with N questions each (is the scoring above chance?) [0: no]")
    parser.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dfq_onnx

    model, tokenizer = eval_quality.model_paths(args.model)
    for need, how in ((model, f"python {realmodel.script(args.model)}"), (TEXTS["shakespeare"], "python tools/shakespeare.py"),
                      *([(args.tasks, "python tools/fetch_tasks.py")] if args.limit else [])):  # fmt: skip
        if not need.exists():
            print(f"paper_table: {need} not found; make it with {how}", file=sys.stderr)
            return 2
    eval_quality.load_text(None, "prideprejudice"), eval_quality.load_text(None, "persuasion")  # cached in data/
    settings = [compare_peers.Setting(int(b), int(g), s == "sym") for b, g, s in (x.split(":") for x in args.settings.split(","))]
    rows = [r for r in args.rows.split(",") if r]
    work = (args.work or REPO / "models" / f"paper-{args.model}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {"rows": {}}

    def save():
        tmp = store.with_name(store.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        os.replace(tmp, store)

    lm_head = compare_peers.lm_head_node(model)
    measures = evaluations(args.limit, args.tasks)
    for s in settings:
        for row in rows:
            key = f"{s.label}/{row}"
            entry = results["rows"].setdefault(key, {})
            if "path" not in entry and "error" not in entry:
                print(f"[{key}] quantizing ...", file=sys.stderr, flush=True)
                entry.update(quantize(row, s, model, work, lm_head, tokenizer))
                save()
        paths = {row: results["rows"][f"{s.label}/{row}"].get("path") for row in rows}
        paths = {row: p for row, p in paths.items() if p}
        for what, options in measures.items():
            todo = [row for row, p in paths.items() if what not in results["rows"][f"{s.label}/{row}"].setdefault("eval", {})]
            if not todo and what in results.get("reference", {}):
                continue
            print(f"[{s.label}] {what}: {len(todo)} models ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            got = dfq_onnx.evaluate(model, [paths[r] for r in todo] or [model], tokenizer=tokenizer, progress=True, **options)
            results.setdefault("reference", {})[what] = got["reference"]
            results.setdefault("seconds", {})[f"{s.label}/{what}"] = time.perf_counter() - t0
            for row, entry in zip(todo, got["candidates"]):
                results["rows"][f"{s.label}/{row}"]["eval"][what] = entry
            save()
    if args.sanity and f"sanity@{args.sanity}" not in results.get("reference", {}):
        print(f"[fp32] {', '.join(SANITY)} at {args.sanity} questions ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        got = dfq_onnx.evaluate(model, [], tasks=sanity_tasks(args.tasks, work), limit=args.sanity, tokenizer=tokenizer, batch=16, progress=True)
        results.setdefault("reference", {})[f"sanity@{args.sanity}"] = got["reference"]
        results.setdefault("seconds", {})[f"fp32/sanity@{args.sanity}"] = time.perf_counter() - t0
        save()
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {compare_peers._memory()}",
        "date": datetime.date.today().isoformat(),
        "command": f"python tools/paper_table.py --model {args.model} --settings {args.settings} --limit {args.limit}"
        + (f" --rows {args.rows}" if args.rows != ",".join(ROWS) else "") + (f" --sanity {args.sanity}" if args.sanity else ""),
    }
    quality, rho = quality_table(results, settings, meta)
    text = [quality, "", "KL per token to the fp32 model: self-generated, 32 x 64 tokens the fp32 model samples itself (seed 0, "
            "temperature 0.8); Pride and Prejudice and Shakespeare, 16 windows of 512 tokens each. Quantize s: wall time with "
            "other runs sharing the cores; GPTQ with data's includes its forward passes over 128 windows of Persuasion where "
            "they were not cached yet. Rows measured by earlier runs on the same --work are shown too.", "",
            "Spearman rank correlation of the KL on self-generated text with the KL on a text: "
            + ", ".join(f"{k} {v:.3f}" for k, v in rho.items())]
    if args.limit:
        odds = chance(args.tasks, args.limit)
        text += ["", task_table(results, settings, odds, args.limit), "",
                 f"{args.limit} questions per task (seeded subsample, the same for every row); accuracy in %, ± its standard error; "
                 "quantized rows: (difference from fp32 ± its paired standard error). Length-normalised accuracy, BoolQ plain. "
                 "Chance: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in odds.items()) + "."]
    if args.sanity:
        text += ["", sanity_line(results["reference"][f"sanity@{args.sanity}"], chance(sanity_tasks(args.tasks, work), args.sanity), args.sanity)]
    spent = sum(results.get("seconds", {}).values())
    text += ["", f"Evaluation time {spent / 60:.0f} min. Machine: {meta['machine']}. Date: {meta['date']}. Command: `{meta['command']}`"]
    body = "\n".join(text)
    print(body)
    begin, end = compare_peers.markers("paper_table", args.model)
    compare_peers.write_section(args.benchmarks, begin, end, f"The paper's comparison ({realmodel.spec(args.model).title})", f"{begin}\n{body}\n{end}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
