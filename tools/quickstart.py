#!/usr/bin/env python3
"""The README's first command: build the real default model if absent, quantize it, show the result.

    python tools/quickstart.py                          # Gemma 3 270M fp32 ONNX, recipe cafeq-int4-cuda
    python tools/quickstart.py --recipe cafeq-int3 --windows 4

After quantizing, the quality of the model it just wrote is measured on a few windows of real text
(Pride and Prejudice) next to round-to-nearest at the same format: perplexity, KL to the fp32
model and top-1 agreement, all through ONNX Runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import build_gemma3_270m  # noqa: E402

MODEL = REPO / "models" / "gemma3-270m" / "dynamo" / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cafeq-int4-cuda", help="built-in recipe name or TOML path (default: cafeq-int4-cuda)")
    parser.add_argument("--windows", type=int, default=2, help="text windows for the quality check (0 to skip; default 2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    print("== building the real default model (skipped when already built)", flush=True)
    if build_gemma3_270m.main(["--styles", "dynamo"]) != 0:
        return 1

    from dfq_onnx.cli import main as dfq
    from dfq_onnx.config import load_recipe

    recipe = load_recipe(args.recipe)
    output = MODEL.with_name(f"model.{recipe.name}.onnx")
    print(f"\n== dfq-onnx optimize {MODEL.relative_to(REPO)} --recipe {args.recipe}", flush=True)
    code = dfq(["optimize", str(MODEL), "-o", str(output), "--recipe", args.recipe])
    if code != 0 or args.windows <= 0:
        return code

    q = recipe.quant
    rtn = MODEL.with_name(f"model.rtn-{q.bits}b-g{q.block_size}-{'sym' if q.symmetric else 'asym'}.onnx")
    fmt = ["--bits", str(q.bits), "--block-size", str(q.block_size), "--symmetric" if q.symmetric else "--asymmetric"]
    print(f"\n== round-to-nearest at the same format, for comparison: {rtn.name}", flush=True)
    code = dfq(["optimize", str(MODEL), "-o", str(rtn), "--method", "rtn", "--verify", "none", "--quiet", *fmt])
    if code != 0:
        return code

    import eval_quality

    print(f"\n== quality on {args.windows} windows of Pride and Prejudice (ONNX Runtime, CPU)", flush=True)
    result = eval_quality.evaluate(str(MODEL), [str(output), str(rtn)], args.windows, progress=False)
    print(eval_quality.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
