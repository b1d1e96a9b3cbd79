#!/usr/bin/env python3
"""How well the data-free prior predicts real activations, layer by layer (evaluation side only).

The method never sees text: it propagates the mean and covariance of the residual stream from
the weights (dfq_onnx/quant/stats.py) and weighs every rounding error by them. This tool measures
how far that estimate is from the activations of real text, at the input of every layer's q/k/v
(the attention norm's output): per channel E[x_k^2], prior vs text.

    python tools/research/prior_vs_real.py --model smollm2 --novel persuasion --windows 4

Columns: `log-corr` is the Pearson correlation of log E[x_k^2] (1 = the prior ranks channels as
the text does), `log-ratio sd` the spread of log(real / prior) over channels (0 = right up to one
factor; what a per-channel scaling chosen from the prior is sensitive to), `worst x` the largest
real / prior ratio after removing the common factor (a channel the prior calls quiet that is
loud), `mean cos` the cosine between the prior's mean and the text's mean. Statistics include
every position (the BOS position too, as the model sees it).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parents[1]  # the user tools these reuse
REPO = TOOLS.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402  (sibling module: sessions, text windows)


def norm_inputs(model_path: Path):
    """(sites, {layer: name of the q/k/v input value}) of an ONNX decoder."""
    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    model = load.load_model(model_path)
    sites = find_sites(model)
    nodes = {node.name: node for node in model.graph}
    names = {}
    for att in sites.attentions:
        first = att.qkv or att.q
        if first:
            names[att.layer] = nodes[first].inputs[0].name
    return model, sites, names


def prior_second_moments(model, sites) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the prior's (E[x^2], E[x]) at the q/k/v input, as the method propagates it."""
    from dfq_onnx.run import planner, prior
    from dfq_onnx.config import MethodConfig, Recipe
    from dfq_onnx.quant import stats
    from dfq_onnx.run.units import layer_units
    from dfq_onnx.run.weights import WeightReader

    # Only the propagation is wanted: every transform and GPTQ off (they do not move the statistics).
    cheap = MethodConfig(scale_search=False, diagonal=False, vo_pairs=False, vo_transform=False,
                         qk_transform=False, gptq=False, online=())
    reader, recipe = WeightReader(model.graph, sites, "cpu"), Recipe(method=cheap)
    residual = prior.initial_statistics(reader, recipe)
    if residual is None:
        raise SystemExit("error: the model has no embedding the prior can start from")
    out = {}
    for unit in layer_units(sites, model.graph):
        att = unit.attention
        if att is not None and att.input_norm is not None and unit.layer is not None:
            gain = reader.gains(unit)[att.input_norm.initializer]
            x = stats.rms_norm(residual, gain)
            mean = x.mean.numpy()
            out[unit.layer] = (x.variances().numpy() + mean**2, mean)
        residual = planner.plan_unit(reader, recipe, unit, residual).residual
    return out


def real_second_moments(model_path: Path, names: dict[int, str], ids: np.ndarray, threads: int | None):
    """Per layer, E[x^2] and E[x] of the q/k/v input over every position of the windows."""
    with eval_quality.with_outputs(model_path, list(names.values()), threads) as lm:
        sq = {layer: 0.0 for layer in names}
        mean = {layer: 0.0 for layer in names}
        count = 0
        wanted = list(names.values())
        for row in ids:
            outs = lm.session.run(wanted, lm.feeds(row[None, :]))
            for layer, act in zip(names, outs):
                x = act.reshape(-1, act.shape[-1]).astype(np.float64)
                sq[layer] = sq[layer] + (x * x).sum(0)
                mean[layer] = mean[layer] + x.sum(0)
            count += row.shape[0]
    return {layer: (sq[layer] / count, mean[layer] / count) for layer in names}


def compare(prior: np.ndarray, real: np.ndarray) -> tuple[float, float, float]:
    lp, lr = np.log(np.maximum(prior, 1e-30)), np.log(np.maximum(real, 1e-30))
    corr = float(np.corrcoef(lp, lr)[0, 1])
    d = lr - lp
    d = d - np.median(d)
    return corr, float(d.std()), float(math.exp(d.max()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=eval_quality.realmodel.DEFAULT_MODEL, choices=sorted(eval_quality.realmodel.MODELS))
    p.add_argument("--onnx", type=Path, help="fp32 ONNX model (default: the model's dynamo export)")
    p.add_argument("--novel", default="persuasion", help="text of the activations (default: persuasion, the tuning text)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    reference, tokenizer = eval_quality.model_paths(args.model)
    path = (args.onnx or reference).resolve()
    model, sites, names = norm_inputs(path)
    prior = prior_second_moments(model, sites)
    ids = eval_quality.make_windows(eval_quality.load_text(None, args.novel), args.windows, tokenizer)
    real = real_second_moments(path, names, ids, args.threads)
    print(f"{path}: q/k/v inputs, prior (from the weights) vs {args.windows} windows of {args.novel}")
    print(f"{'layer':>5}  {'log-corr':>8}  {'log-ratio sd':>12}  {'worst x':>9}  {'mean cos':>8}  {'scale real/prior':>16}")
    for layer in sorted(prior):
        (p2, pm), (r2, rm) = prior[layer], real[layer]
        corr, sd, worst = compare(p2, r2)
        cos = float(pm @ rm / max(np.linalg.norm(pm) * np.linalg.norm(rm), 1e-30))
        scale = float(r2.sum() / max(p2.sum(), 1e-30))
        print(f"{layer:>5}  {corr:>8.3f}  {sd:>12.3f}  {worst:>9.1f}  {cos:>8.3f}  {scale:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
