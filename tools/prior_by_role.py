#!/usr/bin/env python3
"""How well the data-free prior predicts real activations at every role's input, under each token
distribution the prior can start from (evaluation side only: this tool reads text, the method never does).

    python tools/prior_by_role.py --model gemma3-270m --calib-windows 64 --cache /tmp/g3-real64.pt
    python tools/prior_by_role.py --token-priors uniform,self,text --layers

Per role (q/k/v's input, o's, gate/up's, down's), averaged over the layers: `log-corr`, the Pearson
correlation of log E[x_k^2] per channel, prior against text; `mean cos`, the cosine between the prior's
mean vector and the text's. Token priors: `uniform` (every vocabulary row alike), `self` (the model's
own next-token distribution at the prior's mean final state: method.token_prior = "self"), `text` (the
unigram counts of the calibration windows: what no data-free method has, an upper reference).
The real statistics are gap_split.py's (and its --cache files are interchangeable).

`--mlp-check` asks where the prior loses down's input: the gated MLP's moment formulas (stats.py) fed
with the text's mean and covariance of the MLP input, the text's covariance with the prior's mean, the
prior's covariance with the text's mean, and the prior's own (every third layer; log-corr at down).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402  (sibling modules: sessions, text windows, statistics)
import gap_split  # noqa: E402

ROLES = ("q", "o", "gate", "down")  # one linear per input: k/v read q's, up reads gate's


def prior_under(model, sites, token_prior: str, counts: np.ndarray | None):
    """gap_split.prior_moments with the prior started from `token_prior` (text: `counts` as weights)."""
    from dfq_onnx import planner
    from dfq_onnx.config import TokenPrior

    original = planner.Planner.token_weights
    if token_prior == "text":
        planner.Planner.token_weights = lambda self, residual: torch.as_tensor(counts, dtype=torch.float64)
    try:
        return gap_split.prior_moments(model, sites, TokenPrior.UNIFORM if token_prior == "uniform" else TokenPrior.SELF)
    finally:
        planner.Planner.token_weights = original


def per_role(prior: dict, real: dict, inputs: dict, sites) -> dict[str, list[tuple[int, float, float]]]:
    """role -> [(layer, log-corr of E[x^2], cosine of the means)]."""
    out: dict[str, list] = {role: [] for role in ROLES}
    for name, value in inputs.items():
        lin = sites.linears[name]
        if lin.role.value not in out or name not in prior:
            continue
        p_mean, p_second, _ = prior[name]
        r_mean, r_second = real[value]
        lp = np.log(np.maximum(torch.diagonal(p_second).numpy(), 1e-30))
        lr = np.log(np.maximum(torch.diagonal(r_second).numpy(), 1e-30))
        cos = float(p_mean @ r_mean / max(float(p_mean.norm() * r_mean.norm()), 1e-30))
        out[lin.role.value].append((lin.layer, float(np.corrcoef(lp, lr)[0, 1]), cos))
    return {role: sorted(rows) for role, rows in out.items() if rows}


def mlp_check(model, sites, prior: dict, real: dict, inputs: dict) -> None:
    """Print, every third layer, the log-corr at down's input of stats.gated_mlp_hidden under mixed moments."""
    from dfq_onnx import planner
    from dfq_onnx.config import MethodConfig, Recipe
    from dfq_onnx.quant import stats

    make = planner.Planner(model.graph, sites, Recipe(method=MethodConfig(gptq=False)), "cpu", keep_float=False)
    labels = ("text", "prior mean + text cov", "text mean + prior cov", "prior")
    print("down's input, log-corr with the text's E[x^2] when the MLP formulas get: " + " | ".join(labels))
    for mlp in sorted(sites.mlps, key=lambda m: m.layer):
        if mlp.layer % 3:
            continue
        wg, wu = make.weight(sites.linears[mlp.gate]), make.weight(sites.linears[mlp.up])
        if mlp.gate == mlp.up:  # one fused linear: gate columns first
            wg, wu = wg[:, : wg.shape[1] // 2], wg[:, wg.shape[1] // 2 :]
        p_mean, p_second, _ = prior[mlp.gate]
        r_mean, r_second = real[inputs[mlp.gate]]
        p_cov, r_cov = p_second - torch.outer(p_mean, p_mean), r_second - torch.outer(r_mean, r_mean)
        target = np.log(np.maximum(torch.diagonal(real[inputs[mlp.down]][1]).numpy(), 1e-30))
        corrs = []
        for mean, cov in ((r_mean, r_cov), (p_mean, r_cov), (r_mean, p_cov), (p_mean, p_cov)):
            u = stats.gated_mlp_hidden(stats.Moments(mean, cov), wg, wu, stats.activation_kind(mlp.activation))
            energy = np.log(np.maximum((u.variances() + u.mean**2).numpy(), 1e-30))
            corrs.append(float(np.corrcoef(energy, target)[0, 1]))
        print(f"  layer {mlp.layer:>2}: " + " | ".join(f"{c:.2f}" for c in corrs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=eval_quality.realmodel.DEFAULT_MODEL, choices=sorted(eval_quality.realmodel.MODELS))
    p.add_argument("--calib", default="persuasion", help="text of the real statistics (default: persuasion, the tuning text)")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--token-priors", default="uniform,self,text")
    p.add_argument("--layers", action="store_true", help="print every layer, not only the means")
    p.add_argument("--mlp-check", action="store_true", help="also feed the MLP formulas mixed moments (see above)")
    p.add_argument("--cache", type=Path, help="keep the real statistics here (.pt) and reuse them (same model, text, windows)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    reference, tokenizer = eval_quality.model_paths(args.model)
    model = load.load_model(reference)
    sites = find_sites(model)
    inputs = gap_split.linear_inputs(model, sites)
    ids = eval_quality.make_windows(eval_quality.load_text(None, args.calib), args.calib_windows, tokenizer)
    real = gap_split.cached_real_moments(args.cache, reference, sorted(set(inputs.values())), ids, args.threads)
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=sites.embedding.vocab).astype(np.float64)
    print(f"{args.model}: prior against {len(ids)} windows of {args.calib}; per role, mean over layers")
    print(f"{'token prior':<12} " + "  ".join(f"{role + ' log-corr':>14} {role + ' cos':>9}" for role in ROLES))
    for token_prior in [t.strip() for t in args.token_priors.split(",") if t.strip()]:
        prior = prior_under(model, sites, token_prior, counts)
        rows = per_role(prior, real, inputs, sites)
        print(f"{token_prior:<12} " + "  ".join(
            f"{np.mean([c for _, c, _ in rows[r]]):>14.3f} {np.mean([m for _, _, m in rows[r]]):>9.3f}" for r in ROLES if r in rows))
        if args.layers:
            for role, values in rows.items():
                print(f"  {role:<5} log-corr " + " ".join(f"{c:.2f}" for _, c, _ in values))
                print(f"  {role:<5} cos      " + " ".join(f"{m:.2f}" for _, _, m in values))
        if args.mlp_check:
            mlp_check(model, sites, prior, real, inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
