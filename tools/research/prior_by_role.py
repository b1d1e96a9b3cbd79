#!/usr/bin/env python3
"""How well the data-free prior predicts real activations at every role's input, under each token
distribution the prior can start from (evaluation side only: this tool reads text, the method never does).

    python tools/research/prior_by_role.py --model gemma3-270m --calib-windows 64 --cache /tmp/g3-real64.pt
    python tools/research/prior_by_role.py --token-priors uniform,self,text --layers

Per role (q/k/v's input, o's, gate/up's, down's), averaged over the layers: `log-corr`, the Pearson
correlation of log E[x_k^2] per channel, prior against text; `mean cos`, the cosine between the prior's
mean vector and the text's. Token priors: `uniform` (every vocabulary row alike), `self` (the model's
own next-token distribution at the prior's mean final state: method.token_prior = "self"), `text` (the
unigram counts of the calibration windows: what no data-free method has, an upper reference), and
variants not in the method: `self/T` (its logits divided by T), `self*2` (the pass run again from the
distribution the first gave), `rank` (Zipf over the vocabulary index, 1 / (i + 100): BPE vocabularies
number tokens roughly by frequency). `H` is each distribution's entropy, `CE` the text's cross-entropy
under it (nats; the text's own unigram entropy is the floor).
The real statistics are gap_split.py's (and its --cache files are interchangeable).

`--structure R` asks whether the prior's covariance points where the text's does: per layer, the share
of the text's top-R correlation energy that the prior's own top-R directions hold.

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

TOOLS = Path(__file__).resolve().parents[1]  # the user tools these reuse
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402  (sibling modules: sessions, text windows, statistics)
import gap_split  # noqa: E402

RANK_OFFSET = 100  # the `rank` token prior: p_i ~ 1 / (i + RANK_OFFSET) for vocabulary index i
ROLES = ("q", "o", "gate", "down")  # one linear per input: k/v read q's, up reads gate's


def prior_under(model, sites, token_prior: str, counts: np.ndarray | None, seen: list | None = None):
    """gap_split.prior_moments with the prior started from `token_prior` (text: `counts` as weights;
    `seen` gets the token weights used)."""
    from dfq_onnx.run import prior
    from dfq_onnx.config import TokenPrior

    original = prior.token_weights

    def weights(reader, recipe, residual):
        if token_prior == "text":
            w = torch.as_tensor(counts, dtype=torch.float64)
        elif token_prior == "rank":  # Zipf over the vocabulary's order (BPE numbers merges by frequency)
            w = 1.0 / (torch.arange(reader.sites.embedding.vocab, dtype=torch.float64) + RANK_OFFSET)
        else:
            w = original(reader, recipe, residual)
            if token_prior == "self*2":  # once more, from the start the first distribution gives
                w = original(reader, recipe, prior.embedding_moments(reader, w, center=residual.mean / reader.sites.embedding_scale))
            elif token_prior.startswith("self/"):  # softmax(logits / T)
                w = w ** (1.0 / float(token_prior.split("/", 1)[1]))
        if seen is not None:
            seen.append(w / w.sum())
        return w

    prior.token_weights = weights
    try:
        return gap_split.prior_moments(model, sites, TokenPrior.UNIFORM if token_prior == "uniform" else TokenPrior.SELF)
    finally:
        prior.token_weights = original


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
    from dfq_onnx.quant import stats
    from dfq_onnx.run.weights import WeightReader

    reader = WeightReader(model.graph, sites, "cpu")
    labels = ("text", "prior mean + text cov", "text mean + prior cov", "prior")
    print("down's input, log-corr with the text's E[x^2] when the MLP formulas get: " + " | ".join(labels))
    for mlp in sorted(sites.mlps, key=lambda m: m.layer):
        if mlp.layer % 3:
            continue
        wg, wu = reader.weight(sites.linears[mlp.gate]), reader.weight(sites.linears[mlp.up])
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


def correlation_top(second: torch.Tensor, mean: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The correlation matrix of a second moment and its top `rank` eigenvectors."""
    cov = second.double() - torch.outer(mean.double(), mean.double())
    scale = torch.diagonal(cov).clamp(min=1e-30).rsqrt()
    corr = cov * torch.outer(scale, scale)
    return corr, torch.linalg.eigh(corr)[1][:, -rank:]


def structure_check(sites, prior: dict, real: dict, inputs: dict, rank: int) -> None:
    """Print, per role and layer, how much of the text's top-`rank` correlation energy the prior's own
    top-`rank` directions hold (1: the same subspace; random directions hold rank / that energy, as tr(corr) = K)."""
    rows: dict[str, list[tuple[float, float]]] = {role: [] for role in ROLES}
    for name, lin in sorted(sites.linears.items(), key=lambda item: item[1].layer if item[1].layer is not None else -1):
        if lin.role.value not in rows or name not in prior or prior[name][2]:  # a diagonal prior has no directions
            continue
        r_corr, r_top = correlation_top(real[inputs[name]][1], real[inputs[name]][0], rank)
        _, p_top = correlation_top(prior[name][1], prior[name][0], rank)
        best = float(torch.trace(r_top.T @ r_corr @ r_top))
        rows[lin.role.value].append((float(torch.trace(p_top.T @ r_corr @ p_top)) / best, rank / best))
    print(f"share of the text's top-{rank} correlation energy that the prior's top-{rank} directions hold, per layer")
    for role, values in rows.items():
        if values:
            chance = np.mean([c for _, c in values])
            print(f"  {role:<5} " + " ".join(f"{v:.2f}" for v, _ in values) + f"   (random directions: {chance:.2f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=eval_quality.realmodel.DEFAULT_MODEL, choices=sorted(eval_quality.realmodel.MODELS))
    p.add_argument("--calib", default="persuasion", help="text of the real statistics (default: persuasion, the tuning text)")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--token-priors", default="uniform,self,text")
    p.add_argument("--layers", action="store_true", help="print every layer, not only the means")
    p.add_argument("--mlp-check", action="store_true", help="also feed the MLP formulas mixed moments (see above)")
    p.add_argument("--structure", type=int, metavar="R", help="also compare the covariances' top-R correlation directions")
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
    text_p = torch.as_tensor(counts / counts.sum())
    print(f"text unigram entropy {float(-(text_p[text_p > 0] * text_p[text_p > 0].log()).sum()):.2f} nats")
    print(f"{'token prior':<12} {'':<17}" + "  ".join(f"{role + ' log-corr':>14} {role + ' cos':>9}" for role in ROLES))
    for token_prior in [t.strip() for t in args.token_priors.split(",") if t.strip()]:
        seen: list[torch.Tensor] = []
        prior = prior_under(model, sites, token_prior, counts, seen)
        rows = per_role(prior, real, inputs, sites)
        w = seen[0] if seen else torch.full_like(text_p, 1.0 / len(text_p))
        entropy = float(-(w[w > 0] * w[w > 0].log()).sum())
        cross = float(-(text_p * w.clamp(min=1e-300).log()).sum())
        print(f"{token_prior:<12} H {entropy:5.2f} CE {cross:5.2f} " + "  ".join(
            f"{np.mean([c for _, c, _ in rows[r]]):>14.3f} {np.mean([m for _, _, m in rows[r]]):>9.3f}" for r in ROLES if r in rows))
        if args.layers:
            for role, values in rows.items():
                print(f"  {role:<5} log-corr " + " ".join(f"{c:.2f}" for _, c, _ in values))
                print(f"  {role:<5} cos      " + " ".join(f"{m:.2f}" for _, _, m in values))
        if args.mlp_check:
            mlp_check(model, sites, prior, real, inputs)
        if args.structure:
            structure_check(sites, prior, real, inputs, args.structure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
