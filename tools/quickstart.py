#!/usr/bin/env python3
"""The README's first command: build the real default model if absent, quantize it, show the result.

    python tools/quickstart.py                  # Gemma 3 270M, fp32 ONNX (dynamo export), default recipe
    python tools/quickstart.py --recipe rtn-int4
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
    parser.add_argument("--recipe", default="rtn-int4", help="built-in recipe name or TOML path (default: rtn-int4)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    print("== building the real default model (skipped when already built)", flush=True)
    if build_gemma3_270m.main(["--styles", "dynamo"]) != 0:
        return 1

    from dfq_onnx.cli import main as dfq

    output = MODEL.with_name(f"model.{Path(args.recipe).stem}.onnx")
    print(f"\n== dfq-onnx optimize {MODEL.relative_to(REPO)} --recipe {args.recipe}", flush=True)
    return dfq(["optimize", str(MODEL), "-o", str(output), "--recipe", args.recipe])


if __name__ == "__main__":
    sys.exit(main())
