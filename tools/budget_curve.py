#!/usr/bin/env python3
"""KL against size: the budget allocation (--target-bits) against uniform formats, on a real model.

    python tools/budget_curve.py --budgets 2.75,3.25,3.75,4.5,5.5 \\
        --uniform 2:64:asym,2:32:asym,4:128:asym,4:64:asym,4:32:sym,8:128:sym --png docs/budget_kl.png

Quantizes the model (Gemma 3 270M's dynamo export by default, lm_head kept) once per budget and
once per uniform format with the method (recipe cafeq-int4, whose candidate formats are every
2/4/8-bit block 32/64/128 layout), reuses models already in --work, measures each on the same text
windows (eval_quality.py; Pride and Prejudice by default: the weighting was chosen on Persuasion),
prints a markdown table, writes the plot, and with --benchmarks replaces its section there.
Evaluation side only: the quantizer reads no text.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402



def quantize(model: Path, out: Path, args: list[str]) -> dict:
    """Run dfq-onnx once (skipped when `out` and its report exist); its report plus the wall seconds."""
    report = out.with_name(out.stem + ".report.json")
    if not (out.exists() and report.exists()):
        t0 = time.perf_counter()
        cmd = ["dfq-onnx", "optimize", str(model), "-o", str(out), "--verify", "none", "--quiet", "--recipe", "cafeq-int4", *args]
        subprocess.run(cmd, check=True)
        data = json.loads(report.read_text())
        data["wall_seconds"] = time.perf_counter() - t0
        report.write_text(json.dumps(data))
    return json.loads(report.read_text())


def model_bytes(path: Path) -> int:
    """The .onnx file and the external data files it names (a model copied in from an earlier run keeps
    its own data file name)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    files = {entry.value for t in graph.initializer for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def uniform_args(spec: str) -> list[str]:
    bits, block, sym = spec.split(":")
    return ["--bits", bits, "--block-size", block, "--symmetric" if sym == "sym" else "--asymmetric"]


# ORT's quantizer as a peer: k_quant at 4 bits (block 32), optionally with int8 for the linears that
# onnxruntime-genai's k_quant_mixed promotes (llama.cpp's rule: attention V and FFN down of the first and
# last eighth of the layers and of every third layer between). lm_head kept in float, as ours.
ORT_SCRIPT = r"""
import json, sys, onnx
from onnxruntime.quantization import matmul_nbits_quantizer as q
src, out, exclude, upgraded = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
cfg = q.KQuantWeightOnlyQuantConfig(customized_weight_config={n: {"bits": 8} for n in upgraded})
quant = q.MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=False, algo_config=cfg, nodes_to_exclude=[exclude])
quant.process()
quant.model.save_model_to_file(out, True)
"""


def k_quant_mixed_nodes(model: Path) -> tuple[str, list[str]]:
    """(lm_head node, the v and down nodes k_quant_mixed gives 8 bits) of `model`."""
    from dfq_onnx.graph.load import load_model
    from dfq_onnx.graph.sites import find_sites

    sites = find_sites(load_model(model))
    layers = len(sites.layers())
    upgrade = {i for i in range(layers) if i < layers / 8 or i >= 7 * layers / 8 or (i - round(layers / 8)) % 3 == 2}
    nodes = [lin.node for lin in sites.linears.values() if lin.layer in upgrade and lin.role.value in ("v", "qkv", "down")]
    return sites.lm_head or "", nodes


def ort_peer(model: Path, out: Path, mixed: bool) -> dict:
    """Quantize with ORT's k_quant (skipped when `out` exists); bits per weight counted from the file."""
    import onnx

    head, upgraded = k_quant_mixed_nodes(model)
    meta = out.with_name(out.stem + ".peer.json")
    if not (out.exists() and meta.exists()):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", ORT_SCRIPT, str(model), str(out), head, json.dumps(upgraded if mixed else [])], check=True)
        m = onnx.load(str(out))
        inits = {t.name: t for t in m.graph.initializer}
        stored = weights = 0
        for node in m.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weights += attrs["K"] * attrs["N"]
            stored += sum(onnx.numpy_helper.to_array(inits[n], base_dir=str(out.parent)).nbytes * 8 for n in node.input[1:4] if n in inits)
        meta.write_text(json.dumps({"bits": stored / weights, "seconds": time.perf_counter() - t0, "upgraded": len(upgraded) if mixed else 0}))
    return json.loads(meta.read_text())


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = (("uniform", "s", "tab:gray", "dfq-onnx, one format for every linear"),
             ("budget", "o", "tab:blue", "dfq-onnx --target-bits (allocation)"),
             ("ort", "^", "tab:red", "ORT k_quant 4-bit, plain and with k_quant_mixed's int8"))  # fmt: skip
    for kind, marker, color, legend in kinds:
        pts = sorted((r["bits"], r["kl"], r["label"]) for r in rows if r["kind"] == kind)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, linestyle="-" if kind == "budget" else "none", label=legend)
        for b, kl, label in pts:
            ax.annotate(label, (b, kl), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per quantized weight (codes + scales + zero points)")
    ax.set_ylabel("KL to the fp32 model (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| model | bits/weight | size MiB | KL | PPL | top-1 | quantize s | formats |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bits"]):
        lines.append(
            f"| {r['label']} | {r['bits']:.3f} | {r['mib']:.1f} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['top1']:.4f} | "
            f"{r['seconds']:.0f} | {r['formats']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "gemma3-270m" / "dynamo" / "model.onnx",
                        help="a real model's dynamo export (its tokenizer in ../hf, as tools/build_*.py write it)")
    parser.add_argument("--budgets", default="2.75,3.25,3.75,4.5,5.5", help="--target-bits values")
    parser.add_argument("--uniform", default="2:64:asym,2:32:asym,4:128:asym,4:64:asym,4:32:sym,8:128:sym")
    parser.add_argument("--weighting", default="relative", choices=["relative", "residual"])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--novel", default="prideprejudice")
    parser.add_argument("--work", type=Path, default=REPO / "models" / "budget-curve")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--benchmarks", type=Path, default=None, help="replace the budget_curve section of this file")
    parser.add_argument("--group", type=int, default=5, help="models held by ONNX Runtime at once [5]")
    parser.add_argument("--peers", action="store_true", help="also ORT's k_quant, plain and with k_quant_mixed's int8 linears")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    jobs = []  # (kind, label, path, dfq-onnx args)
    for b in filter(None, args.budgets.split(",")):
        extra = ["--target-weighting", args.weighting]
        jobs.append(("budget", f"budget {b}", args.work / f"budget-{b}-{args.weighting}.onnx", ["--target-bits", b, *extra]))
    for spec in filter(None, args.uniform.split(",")):
        jobs.append(("uniform", spec.replace(":", " "), args.work / f"uniform-{spec.replace(':', '-')}.onnx", uniform_args(spec)))
    reports = {str(path): quantize(args.model, path, extra) for _, _, path, extra in jobs}
    if args.peers:
        for mixed in (False, True):
            path = args.work / f"ort-kquant{'-mixed' if mixed else ''}.onnx"
            peer = ort_peer(args.model, path, mixed)
            label = f"ORT k_quant int4 g32{' + int8 (k_quant_mixed: ' + str(peer['upgraded']) + ' linears)' if mixed else ''}"
            jobs.append(("ort", label, path, []))
            reports[str(path)] = {"totals": {"bits_per_weight": peer["bits"]}, "wall_seconds": peer["seconds"], "ort": True}

    text = eval_quality.load_text(novel=args.novel)
    cache = args.work / f"eval-{args.novel}-{args.windows}.json"  # measured models survive a failure later on
    results = json.loads(cache.read_text()) if cache.exists() else {}
    paths = [str(path) for _, _, path, _ in jobs if str(path) not in results]
    for i in range(0, len(paths), args.group):
        chunk = paths[i : i + args.group]
        out = eval_quality.evaluate(str(args.model), chunk, args.windows, text=text, tokenizer_dir=args.model.parent.parent / "hf")
        results.update({c["path"]: c for c in out["candidates"]})
        cache.write_text(json.dumps(results))
    rows = []
    for kind, label, path, _ in jobs:
        rep, res = reports[str(path)], results[str(path)]
        alloc = rep.get("allocation") or {}
        counts: dict[str, int] = {}
        for s in alloc.get("sites", []):
            counts[s["format"]] = counts.get(s["format"], 0) + 1
        formats = ", ".join(f"{n}x {f}" for f, n in sorted(counts.items())) or ("-" if rep.get("ort") else "all " + label)
        size = model_bytes(path)
        rows.append({"kind": kind, "label": label, "bits": rep["totals"]["bits_per_weight"], "mib": size / 2**20, "kl": res["kl"],
                     "ppl": res["ppl"], "top1": res["top1"], "seconds": rep.get("wall_seconds", rep.get("seconds", 0.0)), "formats": formats})  # fmt: skip
    md = table(rows)
    print(md)
    meta = (f"Model: {args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model} (lm_head kept). "
            f"Text: {args.novel}, {args.windows} windows of BOS + 511 tokens, ONNX Runtime CPU. Weighting: {args.weighting}. "
            f"Machine: {platform.machine()}, 2 CPU cores. Date: {time.strftime('%Y-%m-%d')}. "
            f"Command: `python tools/budget_curve.py {' '.join(argv if argv is not None else sys.argv[1:])}`")  # fmt: skip
    if args.png:
        plot(rows, args.png, f"{args.model.parent.parent.name}: KL against stored bits ({args.novel}, {args.windows} windows)")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.benchmarks:
        name = args.model.parent.parent.name
        BEGIN, END = f"<!-- budget_curve:{name}:begin -->", f"<!-- budget_curve:{name}:end -->"  # noqa: N806
        text_md = args.benchmarks.read_text()
        block = f"{BEGIN}\n{meta}\n\n{md}\n{END}"
        if BEGIN in text_md:
            text_md = text_md[: text_md.index(BEGIN)] + block + text_md[text_md.index(END) + len(END) :]
        else:
            text_md += f"\n## Mixed precision under a budget ({name})\n\n{block}\n"
        args.benchmarks.write_text(text_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
