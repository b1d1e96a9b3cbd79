#!/usr/bin/env python3
"""dfq-onnx against ONNX Runtime's own weight quantizer, on one real model, in one run.

For each setting (bits, block, symmetry) every quantizer writes a model from the same fp32 ONNX
with the same lm_head/embedding policy (kept in float), each in its own process so that its wall
time and peak memory are its own; then every model is evaluated through ONNX Runtime on the same
windows of real text (tools/eval_quality.py): perplexity, KL to the fp32 model, top-1 agreement.

    python tools/compare_peers.py --windows 16            # regenerates the table in BENCHMARKS.md
    python tools/compare_peers.py --model smollm2         # the same on SmolLM2-135M, its own section
    python tools/compare_peers.py --before 134bad2        # also the method as it was at that commit, side by side

Peers (onnxruntime.quantization.matmul_nbits_quantizer): DEFAULT (round-to-nearest, symmetric and
asymmetric), HQQ (asymmetric, float zero points) and k_quant (asymmetric, 4-bit only). None of them
emits 3 bits; at 3 bits dfq-onnx's method is compared with its own round-to-nearest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402
import realmodel  # noqa: E402

ROLES = ["q", "k", "v", "o", "gate", "up", "down", "qkv"]


@dataclasses.dataclass(frozen=True)
class Setting:
    bits: int
    block: int
    symmetric: bool

    @property
    def label(self) -> str:
        return f"int{self.bits} g{self.block} {'sym' if self.symmetric else 'asym'}"


SETTINGS = [Setting(4, 32, True), Setting(4, 128, False), Setting(3, 32, False), Setting(2, 32, False)]

# What a model's table needs said about its settings, printed inside the table's block.
NOTES = {
    "smollm2": "Its linears were published as Q4_1 (4-bit asymmetric, block 32, min and scale per block): "
    "int4 g32 asym would only find that grid again, nearly free for every quantizer and not informative, "
    "so it is left out; the settings below all move off that grid.",
}


def markers(kind: str, model: str) -> tuple[str, str]:
    """BENCHMARKS.md markers of one table; the default model's keep their original names."""
    tag = kind if model == realmodel.DEFAULT_MODEL else f"{kind}:{model}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


@dataclasses.dataclass(frozen=True)
class Job:
    setting: Setting
    tool: str  # "ort" or "dfq"
    method: str  # ORT: default / hqq / kquant; dfq: rtn / cafeq
    symmetric: bool
    before: str = ""  # dfq: a git revision whose code runs instead of the checkout's (see --before)
    fast: bool = False  # dfq: with --fast

    @property
    def name(self) -> str:
        who = {"ort": "ORT", "dfq": "dfq-onnx"}[self.tool]
        kind = "" if self.method in ("hqq", "kquant") else (" sym" if self.symmetric else " asym")
        at = f" (at {self.before})" if self.before else (" --fast" if self.fast else "")
        return f"{who} {self.method.upper() if self.tool == 'ort' else self.method}{kind}{at}"

    @property
    def stem(self) -> str:
        s = self.setting
        at = f"-{self.before}" if self.before else ("-fast" if self.fast else "")
        return f"{self.tool}-{self.method}{at}-{'sym' if self.symmetric else 'asym'}-{s.bits}b-g{s.block}"


def checkout_of(rev: str, work: Path) -> Path:
    """The project's code at `rev` in a worktree under `work`, importable as it stands: the passes/
    folder that setuptools maps to dfq_onnx.passes is linked where a plain import finds it."""
    tree = work / f"at-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True)
        (tree / "dfq_onnx" / "passes").symlink_to(tree / "passes", target_is_directory=True)
    return tree


def jobs_for(setting: Setting, before: str = "", fast: bool = False) -> list[Job]:
    jobs: list[Job] = []
    if setting.bits in (2, 4, 8):  # ORT writes 2, 4 and 8 bits; peers never 3
        jobs += [Job(setting, "ort", "default", True), Job(setting, "ort", "default", False)]
        jobs.append(Job(setting, "ort", "hqq", False))
        if setting.bits == 4:  # k_quant's node config is fixed at 4 bits
            jobs.append(Job(setting, "ort", "kquant", False))
    jobs += [Job(setting, "dfq", "rtn", setting.symmetric), Job(setting, "dfq", "cafeq", setting.symmetric)]
    if fast:
        jobs.append(Job(setting, "dfq", "cafeq", setting.symmetric, fast=True))
    if before:
        jobs.append(Job(setting, "dfq", "cafeq", setting.symmetric, before))
    return jobs


ORT_SCRIPT = r"""
import sys, onnx
from onnxruntime.quantization import matmul_nbits_quantizer as q
src, out, method, bits, block, sym, exclude = sys.argv[1:8]
bits, block, sym = int(bits), int(block), sym == "1"
if method == "default":
    cfg = q.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, bits=bits)
elif method == "hqq":
    cfg = q.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
else:
    cfg = q.KQuantWeightOnlyQuantConfig()
# Loaded in memory (as the ORT command line does): k_quant would otherwise keep references to the
# input's external data file by a relative name that does not exist beside the output.
model = onnx.load(src)
quant = q.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=sym, algo_config=cfg,
                               nodes_to_exclude=[exclude] if exclude else [])
quant.process()
quant.model.save_model_to_file(out, True)
"""


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, float | None, str]:
    """Run one quantizer in its own process: (wall seconds, peak RSS in MiB, error or '')."""
    timer = ["/usr/bin/time", "-f", "MAXRSS_KB=%M"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    proc = subprocess.run(timer + cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    match = re.search(r"MAXRSS_KB=(\d+)", proc.stderr)
    rss = int(match.group(1)) / 1024 if match else None
    if proc.returncode != 0:
        lines = [
            ln for ln in proc.stderr.strip().splitlines()
            if ln and not ln.startswith(("MAXRSS_KB", "Command exited", "Command terminated"))
        ]  # the failing tool's own last words, not /usr/bin/time's
        return wall, rss, (lines[-1] if lines else f"exit {proc.returncode}")[:200]
    return wall, rss, ""


def quantize(job: Job, model: Path, out_dir: Path, lm_head: str, head_policy: str = "keep") -> dict:
    """`lm_head` is its node, excluded from ORT's quantizers when `head_policy` keeps it in float."""
    out = out_dir / f"{job.stem}.onnx"
    s = job.setting
    env = cwd = None
    if job.before:  # the code of that revision first on the path (run from there: '' comes first), in its own process
        cwd = checkout_of(job.before, out_dir)
        env = {**os.environ, "PYTHONPATH": str(cwd)}
    if job.tool == "ort":
        exclude = lm_head if head_policy == "keep" else ""
        cmd = [sys.executable, "-c", ORT_SCRIPT, str(model), str(out), job.method, str(s.bits), str(s.block), "1" if job.symmetric else "0", exclude]
    else:
        cmd = [sys.executable, "-m", "dfq_onnx.front.cli", "optimize", str(model), "-o", str(out), "--bits", str(s.bits),
               "--block-size", str(s.block), "--symmetric" if job.symmetric else "--asymmetric",
               "--method", job.method, "--lm-head", head_policy, "--verify", "none", "--quiet"]  # fmt: skip
        cmd += ["--fast"] if job.fast else []
    wall, rss, error = run_measured(cmd, env, cwd)
    return {"job": job, "path": str(out), "seconds": wall, "peak_rss_mib": rss, "error": error}


def untied_head_model(model: Path, lm_head: str, work: Path) -> Path:
    """The model with the lm_head's weight as its own [K, N] initializer, for ORT's quantizers.

    A tied export feeds the head's MatMul from Transpose(embedding); ORT's quantizers skip a MatMul
    without a constant weight, so asked to quantize the head they would keep it in float. The copy
    folds that Transpose into a constant (the embedding's Gather keeps the original)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = work / "ort-input" / "model.onnx"
    if out.is_file():
        return out
    proto = onnx.load(str(model))
    node = next((n for n in proto.graph.node if n.name == lm_head), None)
    producer = next((n for n in proto.graph.node if node is not None and node.input[1] in n.output), None)
    inits = {i.name: i for i in proto.graph.initializer}
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return model  # untied already (or not a transposed constant): ORT reads it as it is
    folded = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[producer.input[0]]).T), f"{lm_head}.untied_weight")
    proto.graph.initializer.append(folded)
    node.input[1] = folded.name
    if not any(producer.output[0] in n.input for n in proto.graph.node):
        proto.graph.node.remove(producer)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out), save_as_external_data=True, location="model.onnx.data")
    return out


def lm_head_node(model: Path) -> str:
    from dfq_onnx.graph.load import load_model
    from dfq_onnx.graph.sites import find_sites

    return find_sites(load_model(model)).lm_head or ""


def evaluate_setting(reference: Path, rows: list[dict], windows: int, text: str, tokenizer: Path, neutral: str | None = None) -> dict:
    """PPL, KL and top-1 on the report text; with `neutral` (another author's text), its KL too."""
    ok = [r for r in rows if not r["error"]]
    result = eval_quality.evaluate(str(reference), [r["path"] for r in ok], windows, text=text,
                                   tokenizer_dir=tokenizer, progress=False)
    by_path = {c["path"]: c for c in result["candidates"]}
    for r in ok:
        r.update({k: by_path[r["path"]][k] for k in ("ppl", "kl", "top1")})
    if neutral is not None:
        other = eval_quality.evaluate(str(reference), [r["path"] for r in ok], windows, text=neutral,
                                      tokenizer_dir=tokenizer, progress=False)
        by_path = {c["path"]: c for c in other["candidates"]}
        for r in ok:
            r["neutral_kl"] = by_path[r["path"]]["kl"]
    return result["reference"]


def bits_per_weight(job: Job) -> str:
    s = job.setting
    container = 4 if s.bits == 3 else s.bits
    scale = 32  # fp32 model: scales are fp32
    zp = 0 if job.symmetric else (scale if job.method == "hqq" else container)  # HQQ's zero points are floats
    return f"{container + (scale + zp) / s.block:.2f}"


def render(rows: list[dict], reference: dict, meta: dict) -> str:
    begin, end = markers(meta["kind"], meta["name"])
    lines = [
        begin,
        f"Model: {meta['model']} (fp32 ONNX, {meta['head']}). "
        f"Text: Pride and Prejudice, {meta['windows']} windows of BOS + 511 tokens ({meta['tokens']} predictions per model; "
        "the same number of Shakespeare's, tools/shakespeare.py, for the neutral column), "
        "ONNX Runtime CPU, MatMulNBits accuracy level 0.",
        f"Machine: {meta['machine']}. Date: {meta['date']}. Command: `{meta['command']}`",
        *([meta["note"]] if meta["note"] else []),
        "",
        "| setting | quantizer | bits/weight | PPL | KL to fp32 | top-1 | KL, Shakespeare | quantize s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| fp32 reference | - | 32 | {reference['ppl']:.3f} | 0 | 1 | 0 | - | - |",
    ]
    for r in rows:
        job = r["job"]
        rss = f"{r['peak_rss_mib']:.0f}" if r["peak_rss_mib"] else "-"
        if r["error"]:
            lines.append(f"| {job.setting.label} | {job.name} | - | failed: {r['error']} | | | | {r['seconds']:.1f} | {rss} |")
            continue
        neutral = f"{r['neutral_kl']:.4f}" if "neutral_kl" in r else "-"
        lines.append(
            f"| {job.setting.label} | {job.name} | {bits_per_weight(job)} | {r['ppl']:.3f} | {r['kl']:.4f} | "
            f"{r['top1']:.4f} | {neutral} | {r['seconds']:.1f} | {rss} |"
        )
    lines.append(end)
    return "\n".join(lines)


def render_proxy(rows: list[dict], meta: dict) -> str:
    """Per role: the method's proxy error against round-to-nearest's, from the method's own reports."""
    reports = []
    for r in rows:
        job = r["job"]
        if job.tool == "dfq" and job.method == "cafeq" and not job.before and not job.fast and not r["error"]:
            path = Path(r["path"]).with_name(Path(r["path"]).stem + ".report.json")
            if path.exists():
                reports.append((job.setting, json.loads(path.read_text()), r["seconds"]))
    layers = max((len({x["layer"] for x in rep["sites"] if x["layer"] is not None}) for _, rep, _ in reports), default=0)
    begin, end = markers("proxy_table", meta["name"])
    lines = [
        begin,
        "Relative proxy error tr(D^T H D) / tr(W^T H W), H the input statistics propagated from the weights "
        f"(v and o: their V/O product), mean over the {layers} layers; round-to-nearest / method. "
        f"Machine: {meta['machine']}. Date: {meta['date']}. From the method's reports of `{meta['command']}`.",
        "",
    ]
    roles = [role for role in ROLES if any(role in {x["role"] for x in rep["roles"]} for _, rep, _ in reports)]
    lines.append("| setting | " + " | ".join(roles) + " | total | method s |")
    lines.append("|---" * (len(roles) + 3) + "|")
    for setting, rep, seconds in reports:
        by = {x["role"]: x for x in rep["roles"]}
        cells = [f"{100 * by[r]['rtn_rel_error']:.3f}% / **{100 * by[r]['rel_error']:.3f}%**" if r in by else "-" for r in roles]
        t = rep["totals"]
        cells.append(f"{100 * t['rtn_rel_error']:.3f}% / **{100 * t['rel_error']:.3f}%**")
        lines.append(f"| {setting.label} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    lines.append(end)
    return "\n".join(lines)


# The proxy tables (the method's own error measure, per role) live on a page of their own, linked from BENCHMARKS.md.
PROXY_PAGE = REPO / "docs" / "proxy-by-role.md"


def write_section(path: Path, begin: str, end: str, title: str, table: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + table + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + table + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=realmodel.DEFAULT_MODEL, choices=list(realmodel.MODELS),
                        help=f"real model: its fp32 export, tokenizer and BENCHMARKS.md section (default: {realmodel.DEFAULT_MODEL})")
    parser.add_argument("--onnx", default=None, help="fp32 ONNX model to quantize instead of the model's dynamo export")
    parser.add_argument("--windows", type=int, default=16, help="text windows of BOS + 511 tokens (default: 16)")
    parser.add_argument("--settings", default=None, help="subset, e.g. '4:32:sym,3:32:sym' (default: the four of the table)")
    parser.add_argument("--work", default=None, help="directory for the quantized models (default: a temporary one)")
    parser.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"), help="file whose table is replaced")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--before", default="", metavar="REV",
                        help="also run the method as it was at this git revision (a worktree in --work), side by side")
    parser.add_argument("--fast", action="store_true", help="also run the method with --fast")
    parser.add_argument("--lm-head", default="keep", choices=["keep", "int8", "int4"],
                        help="keep the lm_head in float (every quantizer), or quantize it: ORT's quantizers at the "
                        "setting's bits (they do not exclude it), dfq-onnx with --lm-head (default: keep)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = realmodel.spec(args.model)
    reference, tokenizer = eval_quality.model_paths(args.model)
    model = Path(args.onnx).resolve() if args.onnx else reference
    if not model.is_file():
        print(f"error: {model} not found; build it with python {realmodel.script(args.model)}", file=sys.stderr)
        return 2
    settings = SETTINGS
    if args.settings:
        settings = [Setting(int(b), int(g), s == "sym") for b, g, s in (x.split(":") for x in args.settings.split(","))]
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="compare_peers_", dir=REPO / "models"))
    work.mkdir(parents=True, exist_ok=True)
    lm_head = lm_head_node(model)
    ort_model = model if args.lm_head == "keep" else untied_head_model(model, lm_head, work)
    text = eval_quality.load_text()
    shakespeare = REPO / "data" / "shakespeare.txt"  # python tools/shakespeare.py
    neutral = eval_quality.load_text(shakespeare) if shakespeare.is_file() else None
    if neutral is None:
        print(f"note: {shakespeare} is missing (python tools/shakespeare.py): no KL on a neutral text", file=sys.stderr)
    rows, reference = [], None
    for setting in settings:
        batch = []
        for job in jobs_for(setting, args.before, args.fast):
            print(f"[{setting.label}] quantizing with {job.name} ...", file=sys.stderr, flush=True)
            source = ort_model if job.tool == "ort" else model
            batch.append(quantize(job, source, work, lm_head, args.lm_head))
        print(f"[{setting.label}] evaluating {len(batch)} models on {args.windows} windows ...", file=sys.stderr, flush=True)
        reference = evaluate_setting(model, batch, args.windows, text, tokenizer, neutral)
        rows += batch
        for r in batch:  # keep the disk small: a setting's models are not needed once evaluated
            for p in Path(r["path"]).parent.glob(Path(r["path"]).name + "*"):
                p.unlink()
    if ort_model != model:
        for p in ort_model.parent.iterdir():
            p.unlink()
        ort_model.parent.rmdir()
    if args.before:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkout_of(args.before, work))], capture_output=True)
    options = [f"--model {args.model}"] if args.model != realmodel.DEFAULT_MODEL else []
    options += [f"--windows {args.windows}"] if args.windows != 16 else []
    options += [f"--settings {args.settings}"] if args.settings else []
    options += [f"--lm-head {args.lm_head}"] if args.lm_head != "keep" else []
    options += ["--fast"] if args.fast else []
    options += [f"--before {args.before}"] if args.before else []
    kind = "compare_peers" if args.lm_head == "keep" else f"compare_peers_lm_head_{args.lm_head}"
    meta = {
        "name": args.model,
        "note": NOTES.get(args.model, ""),
        "kind": kind,
        "head": "lm_head and embedding kept in float by every quantizer" if args.lm_head == "keep" else
                f"lm_head quantized too: by ORT's quantizers at the setting's bits (given a copy whose tied head has its own "
                f"weight, which they quantize), by dfq-onnx with --lm-head {args.lm_head}",
        "model": model.relative_to(REPO) if model.is_relative_to(REPO) else model,
        "windows": args.windows,
        "tokens": args.windows * (eval_quality.WINDOW - 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {_memory()}",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python tools/compare_peers.py", *options]),
    }
    table = render(rows, reference, meta)
    proxy = render_proxy(rows, meta)
    print(table + "\n\n" + proxy)
    head = "" if args.lm_head == "keep" else f", lm_head quantized to {args.lm_head}"
    write_section(Path(args.benchmarks), *markers(kind, args.model),
                  f"Quality against ONNX Runtime's quantizer ({spec.title}{head})", table)
    if args.lm_head == "keep":
        write_section(PROXY_PAGE, *markers("proxy_table", args.model),
                      f"Proxy error per role: round-to-nearest vs the method ({spec.title})", proxy)
    if args.json:
        Path(args.json).write_text(json.dumps([{**r, "job": r["job"].name, "setting": r["job"].setting.label} for r in rows] + [{"reference": reference}], indent=2, default=str))
    return 0


def _memory() -> str:
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        return f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        return "RAM unknown"


if __name__ == "__main__":
    sys.exit(main())
