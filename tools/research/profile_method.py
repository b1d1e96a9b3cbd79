#!/usr/bin/env python3
"""Where the method's time goes: the planner on the first layers of a model, under cProfile.

    python tools/research/profile_method.py models/gemma3-270m/dynamo/model.onnx --layers 3
    python tools/research/profile_method.py model.onnx --layers 2 --bits 3 --asymmetric --block-size 32 --top 30
    python tools/research/profile_method.py model.onnx --layers 2 --no-profile --at 134bad2   # the code of that commit

Runs exactly what `dfq-onnx optimize` runs per layer (the statistics pass included, so the
propagated prior is the real one), nothing is written. Prints the seconds per layer, then the
functions with the most cumulative and the most own time. Evaluation side only: it reads no text.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dfq_onnx import memory  # noqa: E402

from dfq_onnx.run import planner, prior
from dfq_onnx.config import DEFAULT_RECIPE, load_recipe  # noqa: E402
from dfq_onnx.graph import load  # noqa: E402
from dfq_onnx.graph.sites import find_sites  # noqa: E402
from dfq_onnx.run.units import layer_units  # noqa: E402
from dfq_onnx.run.weights import WeightReader  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", type=int, default=2, help="layers to run [2]")
    parser.add_argument("--recipe", default=None, help="recipe name or TOML path [the default]")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--block-size", type=int)
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=25, help="rows of each listing [25]")
    parser.add_argument("--no-profile", action="store_true", help="time the layers only (no cProfile overhead)")
    parser.add_argument("--fast", action="store_true", help="with --fast")
    parser.add_argument("--at", default="", metavar="REV", help="run the code of this git revision (a temporary worktree)")
    args = parser.parse_args(argv)
    if args.at:
        return _at(args.at, [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--at", args.at)])

    overrides = {k: v for k, v in (("bits", args.bits), ("block_size", args.block_size), ("symmetric", args.symmetric)) if v is not None}
    overrides.update({"fast": True} if args.fast else {})
    recipe = load_recipe(args.recipe or DEFAULT_RECIPE).with_overrides(**overrides)
    memory.configure()
    model = load.load_model(args.model)
    sites = find_sites(model)
    reader = WeightReader(model.graph, sites, args.device)
    units = layer_units(sites, model.graph)[: args.layers]
    t0 = time.perf_counter()
    residual = prior.initial_statistics(reader, recipe)
    print(f"statistics from the embedding: {time.perf_counter() - t0:.2f} s")
    profile = None if args.no_profile else cProfile.Profile()
    for unit in units:
        t0 = time.perf_counter()
        if profile:
            profile.enable()
        planned = planner.plan_unit(reader, recipe, unit, residual)
        if profile:
            profile.disable()
        residual = planned.residual
        print(f"{unit.label}: {time.perf_counter() - t0:.2f} s")
        memory.release()
    if profile:
        for key in ("cumulative", "tottime"):
            print(f"\n--- top {args.top} by {key}")
            pstats.Stats(profile).strip_dirs().sort_stats(key).print_stats(args.top)
    return 0


def _at(rev: str, argv: list[str]) -> int:
    """This tool over the code of `rev`: a worktree with this file copied in, run from there."""
    sys.path.insert(0, str(REPO / "tools"))
    import compare_peers

    work = Path(tempfile.mkdtemp(prefix="profile_at_"))
    try:
        tree = compare_peers.checkout_of(rev, work)
        shutil.copy(__file__, tree / "tools" / Path(__file__).name)
        argv = [str(Path(a).resolve()) if Path(a).exists() else a for a in argv]
        return subprocess.run([sys.executable, str(tree / "tools" / Path(__file__).name), *argv], cwd=tree).returncode
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / f"at-{rev}")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
