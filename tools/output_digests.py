"""sha256 digests of dfq-onnx outputs over every tiny model of the test suite and a few settings.

What it is for: a refactor must keep the output bytes identical. Record digests with the code
before the change, record them again after, and compare:

    python tools/output_digests.py --repo /tmp/base --models /tmp/digests/models \\
        --out /tmp/digests/out-base --json /tmp/digests/base.json --real
    python tools/output_digests.py --repo . --models /tmp/digests/models \\
        --out /tmp/digests/out-after --json /tmp/digests/after.json --real --compare /tmp/digests/base.json

Cells are tests/tiny_models.py's cells() (family x export style), built once into --models and
reused; cells the exporter refuses (tiny_models.ExportFailed) are recorded as skipped. Each setting runs
`dfq-onnx optimize` in a subprocess into OUT/<family>/<style>/<setting>/q.onnx (the file name ends up
in the model as its external-data location, so it is the same in every run) and records the sha256
of every file written there except the report (q.report.json), or the exit code and last stderr line.

--repo chooses the checkout whose tests/tiny_models.py and dfq_onnx are used. The venv's editable
install would otherwise win for dfq_onnx.passes (it maps that package to its own checkout's passes/),
so the subprocess drops that finder and maps the chosen repo's pyproject package-dir entries itself;
the resolved dfq_onnx files are printed and stored under "_meta". Threads and the hash seed are fixed
(--threads, PYTHONHASHSEED=0) so runs are byte-reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE_REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "m4": ["--bits", "4"],
    "m3a": ["--bits", "3", "--asymmetric"],
    "rtn4": ["--method", "rtn", "--bits", "4"],
    "qdq4": ["--bits", "4", "--format", "qdq"],
    "head4": ["--bits", "4", "--lm-head", "int4"],
    "f16": ["--bits", "16"],
}
COMMON = ["--verify", "none", "--quiet"]
REAL_KEY = "gemma3-270m/dynamo/default"

# Runs dfq_onnx.front.cli from the repo given as argv[1], whatever the venv's editable install points at.
BOOT = r"""
import importlib.util, os, sys, tomllib
repo = os.path.realpath(sys.argv.pop(1))
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___dfq_onnx")]
sys.path.insert(0, repo)
with open(os.path.join(repo, "pyproject.toml"), "rb") as fh:
    dirs = tomllib.load(fh).get("tool", {}).get("setuptools", {}).get("package-dir", {})
class RepoDirs:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name and name in dirs:
            d = os.path.join(repo, dirs[name])
            return importlib.util.spec_from_file_location(name, os.path.join(d, "__init__.py"), submodule_search_locations=[d])
sys.meta_path.insert(0, RepoDirs)
cli = "dfq_onnx.front.cli" if os.path.isdir(os.path.join(repo, "dfq_onnx", "front")) else "dfq_onnx.cli"  # before 2026-12-08: dfq_onnx/cli.py
if sys.argv[1:] == ["--where"]:
    names = ["dfq_onnx", cli, *dirs]
    print(__import__("json").dumps({n: importlib.import_module(n).__file__ for n in names if n}))
    sys.exit(0)
sys.exit(importlib.import_module(cli).main(sys.argv[1:]))
"""


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_OFFLINE="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("PYTHONPATH", None)  # BOOT puts the repo first itself
    return env


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_one(repo: Path, model: Path, out_dir: Path, flags: list[str], env: dict, timeout: float) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = [sys.executable, "-c", BOOT, str(repo), "optimize", str(model), "-o", str(out_dir / "q.onnx"), *flags]
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"exit": "timeout", "stderr": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["(no stderr)"]
        return {"exit": proc.returncode, "stderr": lines[-1].strip()}
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "q.report.json")
    return {str(p.relative_to(out_dir)): sha256(p) for p in files}


def wanted(key: str, only: list[str]) -> bool:
    cell = key.rsplit("/", 1)[0]
    return not only or any(s in cell for s in only)


def compare(mine: dict, other: dict, keys: set[str] | None = None) -> int:
    mine = {k: v for k, v in mine.items() if not k.startswith("_")}
    other = {k: v for k, v in other.items() if not k.startswith("_")}
    keys = keys if keys is not None else set(mine) | set(other)
    counts = {"equal": 0, "different": 0, "missing": 0}
    width = max(map(len, keys), default=10)
    for key in sorted(keys):
        a, b = mine.get(key), other.get(key)
        status = "missing" if a is None or b is None else ("equal" if a == b else "different")
        counts[status] += 1
        note = ""
        if status == "different":
            note = " ".join(f for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f))
        elif status == "missing":
            note = "not in this run" if a is None else "not in the other file"
        print(f"{key:<{width}}  {status:<9}  {note}")
    print(" ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["different"] or counts["missing"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=HERE_REPO, help="checkout whose dfq_onnx and tests/tiny_models.py run [%(default)s]")
    p.add_argument("--models", type=Path, required=True, help="tiny model cache folder (built when absent, reused after)")
    p.add_argument("--out", type=Path, help="output root: OUT/<family>/<style>/<setting>/q.onnx")
    p.add_argument("--json", type=Path, required=True, help="digests written here (after every run); read with --no-run")
    p.add_argument("--compare", type=Path, help="another digests JSON: print equal/different/missing, exit 1 on any difference")
    p.add_argument("--no-run", action="store_true", help="run nothing; compare --json with --compare")
    p.add_argument("--only", action="append", default=[], help="keep cells whose family/style contains this (repeatable)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {','.join(SETTINGS)} [all]")
    p.add_argument("--real", action="store_true", help=f"add the real Gemma 3 270M at the default recipe ({REAL_KEY})")
    p.add_argument("--real-model", type=Path, default=HERE_REPO / "models/gemma3-270m/dynamo/model.onnx")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each run (fixed for reproducibility) [2]")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run [3600]")
    p.add_argument("--resume", action="store_true",
                   help="keep the entries already in --json (same repo, commit and threads; failures are rerun)")
    args = p.parse_args(argv)

    if args.no_run:
        if not args.compare:
            p.error("--no-run needs --compare")
        return compare(json.loads(args.json.read_text()), json.loads(args.compare.read_text()))
    if args.out is None:
        p.error("--out is required unless --no-run")
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")

    repo = args.repo.resolve()
    env = child_env(args.threads)
    where = subprocess.run([sys.executable, "-c", BOOT, str(repo), "--where"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True)
    resolved = json.loads(where.stdout)
    print(f"dfq_onnx resolves to: {resolved}", flush=True)
    if not all(Path(f).resolve().is_relative_to(repo) for f in resolved.values()):
        print("error: dfq_onnx does not resolve inside --repo", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    sys.path.insert(0, str(repo / "tests"))
    import tiny_models  # noqa: E402  (the chosen repo's)

    results: dict = {"_meta": {"repo": str(repo), "commit": commit, "resolved": resolved, "threads": args.threads,
                               "settings": settings, "complete": False}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    if args.resume and args.json.exists():
        old = json.loads(args.json.read_text())
        same = {k: old.get("_meta", {}).get(k) for k in ("repo", "commit", "threads")}
        if same != {k: results["_meta"][k] for k in same}:
            p.error(f"--resume: {args.json} was made with {same}")
        done = {k: v for k, v in old.items() if not k.startswith("_") and "exit" not in v}

    def save() -> None:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        tmp.replace(args.json)

    jobs: list[tuple[str, object, list[str]]] = []  # key, model path or skip reason, flags
    for family, style in tiny_models.cells():
        if not wanted(f"{family}/{style}/", args.only):
            continue
        try:
            model: object = tiny_models.build(family, style, args.models.resolve())
        except tiny_models.ExportFailed as exc:  # the exporter refuses the cell (or is not installed)
            model = {"skipped": str(exc).splitlines()[0][:300] if str(exc) else "ExportFailed"}
        except Exception as exc:  # a build that broke rather than refused: record it, go on
            model = {"build-error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        jobs += [(f"{family}/{style}/{s}", model, SETTINGS[s]) for s in settings]
    if args.real:
        jobs.append((REAL_KEY, args.real_model.resolve(), []))

    start = time.time()
    for i, (key, model, flags) in enumerate(jobs, 1):
        t = time.time()
        if key in done:
            results[key] = done[key]
            continue
        if isinstance(model, dict):
            results[key] = model
        else:
            results[key] = run_one(repo, model, args.out.resolve() / key, flags + COMMON, env, args.timeout)
        save()
        status = "skip" if isinstance(model, dict) else ("FAIL " + str(results[key]) if "exit" in results[key] else "ok")
        print(f"[{i}/{len(jobs)}] {key}: {status} ({time.time() - t:.1f} s)", flush=True)
    results["_meta"].update(complete=True, wall_s=round(time.time() - start, 1))
    save()
    entries = [v for k, v in results.items() if not k.startswith("_")]
    print(f"{len(entries)} entries: {sum('exit' in v for v in entries)} failed, "
          f"{sum('skipped' in v or 'build-error' in v for v in entries)} skipped; wrote {args.json}")

    if args.compare:
        return compare(results, json.loads(args.compare.read_text()), {k for k, _, _ in jobs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
