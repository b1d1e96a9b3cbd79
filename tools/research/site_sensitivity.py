#!/usr/bin/env python3
"""How much KL rounding one linear alone causes, against the budget's estimate of it.

    python tools/research/site_sensitivity.py --roles q,k,v,o,gate,up,down --layers 0,5,11,17 \\
        --formats 2:64:sym,4:128:asym --windows 3 --json site-kl.json

Evaluation side (it reads text; the quantizer never does). For each chosen linear and format it
rounds that linear alone to nearest (every other weight float) and measures the mean per-token
KL(float || rounded) on the text windows, next to the budget's inputs for that linear: the
relative error under the propagated statistics (centred, as the estimate uses it), the same with
the mean direction kept, and the share of the residual stream its sublayer writes. It prints, per
role, the median KL / relative error (what `sensitivity.ROLE_SENSITIVITY` holds) and how far each
weighting's estimate is from the measured KL (RMS of the log-ratio after the best common factor).
One ONNX Runtime session serves every linear: the chosen weights become graph inputs.
Tune on Persuasion (the default text), report on Pride and Prejudice.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parents[1]  # the user tools these reuse
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402


def site_statistics(model_path: Path, recipe_name: str):
    """{node: (Linear, SiteStatistics)} for every decoder linear, by the prior's own propagation."""
    from dfq_onnx.run import prior
    from dfq_onnx.config import load_recipe
    from dfq_onnx.graph.load import load_model
    from dfq_onnx.graph.sites import find_sites
    from dfq_onnx.run.units import layer_units
    from dfq_onnx.run.weights import WeightReader

    model = load_model(model_path)
    sites = find_sites(model)
    reader, recipe = WeightReader(model.graph, sites, "cpu"), load_recipe(recipe_name)
    residual = prior.initial_statistics(reader, recipe)
    out = {}
    for unit in layer_units(sites, model.graph):
        if unit.layer is None:
            continue
        stats_of, residual = prior.site_statistics(reader, recipe, unit, residual)
        out.update({lin.node: (lin, stats_of[lin.node]) for lin in unit.linears})
    return out


def with_weight_inputs(model_path: Path, names: list[str], out: Path) -> dict[str, np.ndarray]:
    """Write the model with the named initializers as graph inputs; their float values."""
    import onnx

    proto = onnx.load(str(model_path))
    inits = {t.name: t for t in proto.graph.initializer}
    values = {}
    for name in names:
        t = inits[name]
        values[name] = onnx.numpy_helper.to_array(t).copy()
        proto.graph.initializer.remove(t)
        proto.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    onnx.save(proto, str(out), save_as_external_data=True, location=out.name + ".data")
    return values


class WeightFedLM(eval_quality.OrtLM):
    """An OrtLM whose weight inputs are fed beside the token inputs."""

    def __init__(self, path: Path, weights: dict[str, np.ndarray]):
        self.path = path
        self.session = eval_quality.make_session(path)
        self.inputs = [i for i in self.session.get_inputs() if i.name not in weights]
        self._present = {o.name: o.shape for o in self.session.get_outputs()}
        self._head_size = None
        outputs = [o.name for o in self.session.get_outputs()]
        self.logits_name = "logits" if "logits" in outputs else outputs[0]
        self.base = weights

    def run(self, ids: np.ndarray, replaced: dict[str, np.ndarray] | None = None) -> np.ndarray:
        feeds = {**self.feeds(ids[None]), **self.base, **(replaced or {})}
        return self.session.run([self.logits_name], feeds)[0][0, :-1].astype(np.float32)


def log_rms(pairs: list[tuple[float, float]]) -> float:
    """RMS of log(measured / estimate) after the best common factor."""
    logs = [math.log(m / e) for m, e in pairs if m > 0 and e > 0]
    mid = sum(logs) / len(logs)
    return math.sqrt(sum((v - mid) ** 2 for v in logs) / len(logs))


def main(argv: list[str] | None = None) -> int:
    from dfq_onnx.run.budget import format_label, parse_formats
    from dfq_onnx.quant import grid, sensitivity

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "gemma3-270m" / "dynamo" / "model.onnx")
    parser.add_argument("--roles", default="q,k,v,o,gate,up,down")
    parser.add_argument("--layers", default="0,5,11,17", help="layer indices; negative counts from the end")
    parser.add_argument("--formats", default="2:64:sym,4:128:asym")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--novel", default="persuasion")
    parser.add_argument("--recipe", default="cafeq-int4")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    formats = parse_formats(args.formats)
    found = site_statistics(args.model, args.recipe)
    layers = sorted({lin.layer for lin, _ in found.values()})
    wanted_layers = {layers[int(i)] for i in args.layers.split(",")}
    roles = args.roles.split(",")
    picked = {n: v for n, v in found.items() if v[0].layer in wanted_layers and v[0].role.value in roles}
    if not picked:
        parser.error("no linear matches --roles and --layers")
    rows = {}
    for node, (lin, st) in picked.items():
        centred = sensitivity.relative_errors(st, formats)
        kept = sensitivity.relative_errors(st, formats, centred=False)
        rows[node] = {"role": lin.role.value, "layer": lin.layer, "share": st.share,
                      "formats": {format_label(f): {"rel": c, "rel_with_mean": k} for f, c, k in zip(formats, centred, kept)}}  # fmt: skip

    text = eval_quality.load_text(novel=args.novel)
    batches = eval_quality.make_windows(text, args.windows, args.model.parent.parent / "hf")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        values = with_weight_inputs(args.model, [lin.weight.initializer for lin, _ in picked.values()], path)
        lm = WeightFedLM(path, values)
        t0 = time.perf_counter()
        for w, ids in enumerate(batches):
            ref = lm.run(ids)
            for node, (lin, st) in picked.items():
                for f in formats:
                    q = grid.fake_quant(st.weight, f, st.scale_dtype).numpy()
                    q = q.T if lin.weight.transposed else q
                    logits = lm.run(ids, {lin.weight.initializer: np.ascontiguousarray(q, dtype=values[lin.weight.initializer].dtype)})
                    _, kl, _ = eval_quality.compare(ref, logits, ids[1:])
                    cell = rows[node]["formats"][format_label(f)]
                    cell["kl"] = cell.get("kl", 0.0) + kl / (len(ids) - 1) / len(batches)
            print(f"window {w + 1}/{len(batches)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print("| linear | role | layer | share | format | KL | relative error (centred) | with the mean |")
    print("|---|---|---|---|---|---|---|---|")
    for node, r in rows.items():
        for label, c in r["formats"].items():
            print(f"| {node} | {r['role']} | {r['layer']} | {r['share']:.3f} | {label} | {c['kl']:.5f} | {c['rel']:.5f} | {c['rel_with_mean']:.5f} |")
    cells = [(r, c) for r in rows.values() for c in r["formats"].values()]
    ratio = {role: statistics.median(c["kl"] / c["rel"] for r, c in cells if r["role"] == role) for role in dict.fromkeys(r["role"] for r in rows.values())}
    top = max(ratio.values())
    print("\nmedian KL / relative error per role (relative to the largest):", {k: round(v / top, 3) for k, v in ratio.items()})
    fits = {
        "relative (centred)": [(c["kl"], c["rel"]) for _, c in cells],
        "relative with the mean": [(c["kl"], c["rel_with_mean"]) for _, c in cells],
        "residual share x centred": [(c["kl"], r["share"] * c["rel"]) for r, c in cells],
        "role factor x centred (fitted here)": [(c["kl"], ratio[r["role"]] * c["rel"]) for r, c in cells],
    }
    for name, pairs in fits.items():
        print(f"{name:>26}: RMS log-ratio {log_rms(pairs):.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "role_ratio": ratio, "command": sys.argv}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
