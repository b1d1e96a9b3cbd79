#!/usr/bin/env python3
"""How many of a model's decoder weights fall exactly on a rounding tie under round-to-nearest.

A weight is on a tie when x = w * (1/s) + z, computed in float32 as ONNX Runtime computes it, has a
fractional part of exactly 0.5: the tie rule alone then decides its code (ORT rounds half away from
zero). Weights converted from a coarser grid (GGUF's q4/q8 blocks) land on ties far more often than
trained weights do, and a method's gain over round-to-nearest can then be partly a gain over ORT's
tie rule. This counts them, per role and in total, for each format asked.

    python tools/research/tie_share.py                           # Gemma 3 270M, the peer table's four formats
    python tools/research/tie_share.py --model smollm2 --formats 4:32:sym,4:128:asym

Reads weights only; the lm_head and embedding are left out, as every quality table leaves them in float.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parents[1]  # the user tools these reuse
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402  (the real models' paths)
import realmodel  # noqa: E402

DEFAULT_FORMATS = "4:32:sym,4:128:asym,3:32:asym,2:32:asym"


def tie_count(w: torch.Tensor, fmt) -> int:
    """Entries of W[K, N] whose scaled value sits exactly halfway between two codes (inside the grid)."""
    from dfq_onnx.quant import grid

    blocks = grid.to_blocks(w.to(torch.float32), fmt.block_size)
    scales, zero = grid.rtn_params(blocks, fmt, torch.float32)
    inv = torch.where(scales != 0, 1.0 / torch.where(scales != 0, scales, 1.0), 0.0)
    z = torch.full_like(scales, float(1 << (fmt.bits - 1))) if zero is None else zero.to(torch.float32)
    x = blocks * inv.unsqueeze(-1) + z.unsqueeze(-1)
    inside = (x > 0) & (x < grid.grid_max(fmt.bits))
    return int(((x - torch.floor(x) == 0.5) & inside).sum())


def parse_formats(text: str):
    from dfq_onnx.config import QuantFormat

    out = []
    for item in text.split(","):
        try:
            bits, block, kind = item.split(":")
            out.append(QuantFormat(int(bits), int(block), kind == "sym"))
        except ValueError:
            raise SystemExit(f"error: format '{item}' is not BITS:BLOCK:sym|asym (e.g. 4:32:sym)") from None
    return out


def label(fmt) -> str:
    return f"int{fmt.bits} g{fmt.block_size} {'sym' if fmt.symmetric else 'asym'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=realmodel.DEFAULT_MODEL, choices=list(realmodel.MODELS), help="real model (default: %(default)s)")
    parser.add_argument("--onnx", default=None, help="any ONNX decoder instead of a named real model")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help="BITS:BLOCK:sym|asym, comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    formats = parse_formats(args.formats)
    path = Path(args.onnx) if args.onnx else eval_quality.model_paths(args.model)[0]
    if not path.is_file():
        hint = f"build it with python {realmodel.script(args.model)}" if not args.onnx else "give an existing .onnx file"
        print(f"error: {path} not found; {hint}", file=sys.stderr)
        return 2

    from dfq_onnx.graph.load import load_model
    from dfq_onnx.graph.site_types import Role
    from dfq_onnx.graph.sites import find_sites
    from dfq_onnx.run.weights import WeightReader

    model = load_model(path)
    sites = find_sites(model)
    reader = WeightReader(model.graph, sites, "cpu")
    ties: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    sizes: collections.Counter = collections.Counter()
    for lin in sites.linears.values():
        if lin.role == Role.LM_HEAD or lin.layer is None:
            continue
        w = reader.weight(lin)
        sizes[lin.role.value] += w.numel()
        for fmt in formats:
            ties[label(fmt)][lin.role.value] += tie_count(w, fmt)
    roles = sorted(sizes)
    print(f"{path}: share of decoder weights exactly on a rounding tie under round-to-nearest")
    print("| format | " + " | ".join(roles) + " | all |")
    print("|---|" + "---|" * (len(roles) + 1))
    for fmt in formats:
        per = ties[label(fmt)]
        cells = [f"{per[r] / sizes[r]:.1%}" for r in roles]
        print(f"| {label(fmt)} | " + " | ".join(cells) + f" | **{sum(per.values()) / sum(sizes.values()):.1%}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
