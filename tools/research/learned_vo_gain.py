#!/usr/bin/env python3
"""What the learned V/O block buys, layer by layer: the V/O pair rounded as the method rounds it
(GPTQ, scale search, alternations) with the searched block and with the learned one.

    python tools/research/learned_vo_gain.py models/gemma3-270m/dynamo/model.onnx --bits 4 --block-size 32 --symmetric
    python tools/research/learned_vo_gain.py model.onnx --bits 3 --asymmetric --steps 100 --lr 0.001 --layers 6

Runs the planner over the first layers (the statistics pass included, so the propagated prior is the
real one); wherever the method would learn the V/O block it also rounds the pair without it, and
prints the ratio of the two pair errors (the proxy the learner serves) and the learner's seconds.
Nothing is written. Evaluation side only: it reads no text.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dfq_onnx import memory  # noqa: E402

from dfq_onnx.run import planner, prior
from dfq_onnx.config import DEFAULT_RECIPE, load_recipe  # noqa: E402
from dfq_onnx.graph import load  # noqa: E402
from dfq_onnx.graph.sites import find_sites  # noqa: E402
from dfq_onnx.quant import value_output  # noqa: E402
from dfq_onnx.quant.site import SiteTransform  # noqa: E402
from dfq_onnx.run.units import layer_units  # noqa: E402
from dfq_onnx.run.weights import WeightReader  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", type=int, default=0, help="layers to run [all]")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--block-size", type=int)
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    parser.add_argument("--steps", type=int, default=100, help="the learner's Adam steps [100]")
    parser.add_argument("--lr", type=float, default=0.001, help="its learning rate [0.001]")
    parser.add_argument("--objective", choices=("pair", "ranges"), default="pair",
                        help="what it descends: the rounded pair error, or the smooth range surrogate [pair]")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in (("bits", args.bits), ("block_size", args.block_size), ("symmetric", args.symmetric)) if v is not None}
    recipe = load_recipe(DEFAULT_RECIPE).with_overrides(**overrides)
    recipe = dataclasses.replace(recipe, method=dataclasses.replace(recipe.method, learned_vo_steps=args.steps, learned_vo_lr=args.lr,
                                                                    learned_vo_objective=args.objective))
    rows: list[tuple[float, float]] = []
    learned_pair = value_output._learned_pair

    def measured(pair, a, tf_v, how_v, how_o, v_dtype, o_dtype):
        t0 = time.perf_counter()
        found = learned_pair(pair, a, tf_v, how_v, how_o, v_dtype, o_dtype)
        seconds = time.perf_counter() - t0
        tf_o = SiteTransform(row=None if tf_v.col is None else tf_v.col.inverse())
        searched = value_output.round_pair(pair, tf_v, tf_o, how_v, how_o, v_dtype, o_dtype)[2]
        learned = searched if found is None else min(searched, value_output.round_pair(pair, *found, how_v, how_o, v_dtype, o_dtype)[2])
        rows.append((learned / searched if searched > 0 else 1.0, seconds))
        print(f"  pair {len(rows) - 1}: learned / searched {rows[-1][0]:.4f}, learner {seconds:.2f} s", flush=True)
        return found

    value_output._learned_pair = measured
    memory.configure()
    model = load.load_model(args.model)
    sites = find_sites(model)
    reader = WeightReader(model.graph, sites, "cpu")
    units = layer_units(sites, model.graph)
    residual = prior.initial_statistics(reader, recipe)
    for unit in units[: args.layers or len(units)]:
        residual = planner.plan_unit(reader, recipe, unit, residual).residual
        memory.release()
    if not rows:
        print("no V/O pair was learned (no vo_transform, or no attention output found)")
        return 1
    mean = math.exp(sum(math.log(r) for r, _ in rows) / len(rows))
    print(f"{len(rows)} pairs: learned / searched pair error, geometric mean {mean:.4f} (best {min(r for r, _ in rows):.4f}); "
          f"learner {sum(s for _, s in rows):.1f} s in all")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
