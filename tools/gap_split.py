#!/usr/bin/env python3
"""Where the distance to GPTQ comes from: the method's solver under four Hessians (evaluation side).

The method rounds every linear by GPTQ (with its per-block scale search) under a Hessian that it
propagates from the weights, kept as diag(var) + m m^T. GPTQ proper measures E[x x^T] on
calibration text. This tool runs the *same solver*, no transforms, with H from:

    real dense       E[x x^T] measured on text (what GPTQ uses)
    real diag+mean   diag(var) + m m^T of the same measurement
    prior dense      the propagated covariance + m m^T (the method's statistics, dense)
    prior diag+mean  what the method's GPTQ uses today

(and between them, for either source: `-rankR`, diagonal + the covariance's top R eigenpairs + mean;
`-shrunkA`, diagonal + mean + A times the off-diagonal covariance; `real-diag+mean@ROLES`, real
statistics at those roles' inputs only), and measures each quantized model on real text.
real dense -> real diag+mean is the cost of the Hessian's structure, real diag+mean -> prior
diag+mean the cost of the prior's values, and the distance from real dense to GPTQ's own result is
the solver's.

    python tools/gap_split.py --model gemma3 --bits 4 --block-size 32 --symmetric
    python tools/gap_split.py --bits 3 --block-size 32 --asymmetric --calib-windows 128 --windows 16

Statistics come from the tuning text (Persuasion), quality is measured on Pride and Prejudice.
`--calib generated` measures them instead on sequences the model samples itself (seeded, from its
first token, through its onnxruntime-genai export's KV cache): the statistics a data-free run may use.
Only this tool reads text: it hands the quantization path a method of its own for the run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402  (sibling module: sessions, text windows)

VARIANTS = ("real-dense", "real-diag+mean", "prior-dense", "prior-diag+mean")
# Also accepted: real-rank<R>, prior-rank<R>: diag(var) + m m^T + the covariance's top R eigenpairs
# (the diagonal kept at var): how much of the off-diagonal structure a rank-R factor carries;
# real-diag+mean@ROLES (e.g. @o,down): real statistics at those roles' inputs, the prior's elsewhere:
# which role's prior values cost the most. Roles: qkv, o, gate_up, down.
ROLE_GROUPS = {"qkv": ("q", "k", "v", "qkv"), "o": ("o",), "gate_up": ("gate", "up", "gate_up"), "down": ("down",)}


# ----------------------------------------------------------------------------- statistics


def linear_inputs(model, sites) -> dict[str, str]:
    """Decoder linear -> the name of the value it reads (q/k/v share theirs; the lm_head is left out)."""
    nodes = {node.name: node for node in model.graph}
    return {name: nodes[name].inputs[0].name for name, lin in sites.linears.items() if lin.layer is not None}


def real_moments(model_path: Path, values: list[str], ids: np.ndarray, threads: int | None) -> dict[str, tuple]:
    """Per value, (E[x], E[x x^T]) over every position of the windows, float64."""
    with eval_quality.with_outputs(model_path, values, threads) as lm:
        s1 = {v: 0.0 for v in values}
        s2 = {v: 0.0 for v in values}
        count = 0
        for i, row in enumerate(ids):
            outs = lm.session.run(values, lm.feeds(row[None, :]))
            for name, act in zip(values, outs):
                x = torch.from_numpy(act.reshape(-1, act.shape[-1]).astype(np.float64))
                s1[name] = s1[name] + x.sum(0)
                s2[name] = s2[name] + x.t() @ x
            count += row.shape[0]
            print(f"\r  activations: window {i + 1}/{len(ids)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    return {v: (s1[v] / count, s2[v] / count) for v in values}


@contextlib.contextmanager
def recording_prior():
    """Record the propagated moments at every linear input while the method runs (its own code)."""
    from dfq_onnx.quant import attention, mlp, site, stats

    seen: list[tuple[str, stats.Moments]] = []
    original_hessian, original_output = site.hessian, stats.attention_output

    def hessian(x, *args):
        seen.append(("hessian", x))
        return original_hessian(x, *args)

    def attention_output(*args, **kwargs):
        z = original_output(*args, **kwargs)
        seen.append(("attention", z))
        return z

    patched = [(site, "hessian", hessian), (attention, "hessian", hessian), (mlp, "hessian", hessian), (stats, "attention_output", attention_output)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    for mod, name, fn in patched:
        setattr(mod, name, fn)
    try:
        yield seen
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def prior_moments(model, sites, token_prior=None) -> dict[str, tuple]:
    """Per decoder linear, (E[x], E[x x^T] dense, E[x x^T] diag+mean) of the propagated prior (started
    from `token_prior`, the method's default if None)."""
    from dfq_onnx.run import planner, prior
    from dfq_onnx.config import MethodConfig, Recipe
    from dfq_onnx.run.units import layer_units
    from dfq_onnx.run.weights import WeightReader

    # Only the propagation is wanted: transforms and GPTQ off (they do not move the statistics).
    cheap = MethodConfig(scale_search=False, diagonal=False, vo_pairs=False, vo_transform=False, qk_transform=False, gptq=False, online=())
    if token_prior is not None:
        cheap = dataclasses.replace(cheap, token_prior=token_prior)
    reader, recipe = WeightReader(model.graph, sites, "cpu"), Recipe(method=cheap)
    residual = prior.initial_statistics(reader, recipe)
    out: dict[str, tuple] = {}
    for unit in layer_units(sites, model.graph):
        with recording_prior() as seen:
            residual = planner.plan_unit(reader, recipe, unit, residual).residual
        hessians = [x for kind, x in seen if kind == "hessian"]
        outputs = [x for kind, x in seen if kind == "attention"]
        att, mlp = unit.attention, unit.mlp
        groups = []
        if att is not None and (att.q or att.qkv):
            groups.append(([n for n in (att.q, att.k, att.v, att.qkv) if n], hessians.pop(0)))
            if att.o and outputs:
                groups.append(([att.o], outputs[-1]))
        if mlp is not None:
            groups.append(([n for n in dict.fromkeys((mlp.gate, mlp.up)) if n], hessians.pop(0)))
            groups.append(([mlp.down], hessians.pop(0)))
        for names, x in groups:
            mean = x.mean.double()
            second = x.dense_cov().double() + torch.outer(mean, mean)
            for name in names:
                out[name] = (mean, second, x.diagonal)
    return out


def real_roles(variant: str) -> set[str] | None:
    """The roles a `real-diag+mean@ROLES` variant takes from text (None: the variant says real or prior whole)."""
    if "@" not in variant:
        return None
    groups = [g.strip() for g in variant.split("@", 1)[1].split(",") if g.strip()]
    unknown = [g for g in groups if g not in ROLE_GROUPS]
    if unknown:
        raise SystemExit(f"error: unknown role group {unknown[0]!r} in {variant!r}; use {', '.join(ROLE_GROUPS)}")
    return {role for g in groups for role in ROLE_GROUPS[g]}


def hessians(variant: str, real: dict[str, tuple], prior: dict[str, tuple], inputs: dict[str, str], roles: dict[str, str] | None = None):
    """Linear -> H in the solver's forms: a dense [K, K] tensor, or rounding.LowRank (diag + m m^T).
    `roles` (linear -> role) is needed by the `@ROLES` variants."""
    from dfq_onnx.quant import rounding

    mixed = real_roles(variant)
    if mixed is not None:
        variant = variant.split("@", 1)[0]
    out, by_value = {}, {}  # linears reading one value (q/k/v) share one H, not a copy each
    for name, value in inputs.items():
        if value in by_value:
            out[name] = by_value[value]
            continue
        if mixed is not None and (roles or {}).get(name) not in mixed:
            mean, second, _ = prior[name]
        elif variant.startswith("real"):
            mean, second = real[value]
        else:
            mean, second, _ = prior[name]
        if variant.endswith("dense"):
            out[name] = second.float()
        elif "-rank" in variant:
            out[name] = low_rank_plus_diagonal(mean, second, int(variant.rsplit("rank", 1)[1])).float()
        elif "-shrunk" in variant:
            out[name] = shrunk_covariance(mean, second, float(variant.rsplit("shrunk", 1)[1])).float()
        else:
            var = torch.diagonal(second) - mean * mean
            out[name] = rounding.LowRank(var.clamp(min=0).float(), mean.float())
        by_value[value] = out[name]
    return out


def shrunk_covariance(mean: torch.Tensor, second: torch.Tensor, keep: float) -> torch.Tensor:
    """m m^T + diag(var) + keep * (the covariance's off-diagonal part): trusting the off-diagonal
    structure a fraction `keep` (0: diag + mean, 1: dense), the variances and mean kept exact."""
    cov = second - torch.outer(mean, mean)
    diag = torch.diag(torch.diagonal(cov))
    return torch.outer(mean, mean) + diag + keep * (cov - diag)


def low_rank_plus_diagonal(mean: torch.Tensor, second: torch.Tensor, rank: int) -> torch.Tensor:
    """m m^T + U L U^T (the covariance's top `rank` eigenpairs) + the diagonal that keeps var exact."""
    cov = second - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)
    top = vectors[:, -rank:] * values[-rank:].clamp(min=0)
    factor = top @ vectors[:, -rank:].t()
    rest = (torch.diagonal(cov) - torch.diagonal(factor)).clamp(min=0)
    return factor + torch.diag(rest) + torch.outer(mean, mean)


def cached_real_moments(cache: Path | None, model_path: Path, values: list[str], ids, threads) -> dict[str, tuple]:
    """real_moments, kept in `cache` (.pt) for later runs on the same model and text."""
    if cache is not None and cache.is_file():
        return torch.load(cache)
    real = real_moments(model_path, values, ids, threads)
    if cache is not None:
        torch.save(real, cache)
    return real


def calibration_ids(args, reference: Path, tokenizer: Path) -> np.ndarray:
    """Windows of the calibration text, or with --calib generated, sequences the model samples
    itself (its onnxruntime-genai export, through its KV cache: the same weights as `reference`)."""
    if args.calib != "generated":
        return eval_quality.make_windows(eval_quality.load_text(None, args.calib), args.calib_windows, tokenizer)
    from dfq_onnx.evaluation import models, sampling

    genai = reference.parent.parent / "genai"
    if not (genai / "model.onnx").is_file():
        raise SystemExit(f"error: --calib generated samples with {genai}; build it with the model's tools/build_*.py --styles genai")
    sampler = models.load(genai)
    bos = models.bos_token_id(genai)
    t0 = time.perf_counter()
    ids = sampling.generate(sampler, args.calib_windows, args.calib_length, args.temperature, args.seed, bos)
    print(f"generated {args.calib_windows} x {args.calib_length} tokens at temperature {args.temperature}: {time.perf_counter() - t0:.0f}s")
    return ids


# ----------------------------------------------------------------------------- quantization


@contextlib.contextmanager
def solver_with(hs: dict, damp: float = 0.01):
    """The quantization path with a method of this tool: GPTQ + scale search under `hs`, no transforms."""
    from dfq_onnx import methods
    from dfq_onnx.config import MethodConfig
    from dfq_onnx.quant import rounding

    original = methods.method_for(MethodConfig())

    def gptq_only(unit, data, fmt, config):
        if unit.is_head:
            return methods.round_to_nearest(unit, data, fmt, config)
        quantized = {}
        for name, w in data.weights.items():
            quantized[name] = rounding.gptq(w, hs[name], fmt, data.scale_dtypes[name], search_scales=True, damp=damp)
        return methods.UnitResult(quantized=quantized)

    methods.install(dataclasses.replace(original, quantize=gptq_only))
    try:
        yield
    finally:
        methods.install(original)


def quantize(model_path: Path, out: Path, fmt_flags: dict) -> float:
    from dfq_onnx.config import Recipe, load_recipe
    from dfq_onnx.run.pipeline import RunOptions, optimize

    recipe: Recipe = load_recipe("cafeq-int4-cuda").with_overrides(**fmt_flags, online="none")
    t0 = time.perf_counter()
    optimize(model_path, out, recipe, RunOptions(verify="none"))
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=eval_quality.realmodel.DEFAULT_MODEL, choices=sorted(eval_quality.realmodel.MODELS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=True)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    p.add_argument("--calib", default="persuasion", help="text of the real statistics (default: persuasion, the tuning text), "
                   "or 'generated': sequences the model samples itself (no text)")
    p.add_argument("--calib-windows", type=int, default=128, help="windows of the text, or sequences with --calib generated")
    p.add_argument("--calib-length", type=int, default=512, help="--calib generated: tokens per sequence [512]")
    p.add_argument("--temperature", type=float, default=0.8, help="--calib generated: sampling temperature [0.8]")
    p.add_argument("--seed", type=int, default=0, help="--calib generated: seed [0]")
    p.add_argument("--novel", default="prideprejudice", help="text the quality is measured on")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=None, help="folder for the quantized models (default: beside the model)")
    p.add_argument("--threads", type=int)
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ's damping, a fraction of mean diag H (default 0.01, GPTQ-with-data's; the method uses 0.3)")
    p.add_argument("--cache", type=Path, help="keep the real statistics here (.pt) and reuse them (same model, text, windows)")
    args = p.parse_args(argv)

    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    reference, tokenizer = eval_quality.model_paths(args.model)
    model = load.load_model(reference)
    sites = find_sites(model)
    inputs = linear_inputs(model, sites)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    fmt = {"bits": args.bits, "block_size": args.block_size, "symmetric": args.symmetric}
    tag = f"{args.bits}b-g{args.block_size}-{'sym' if args.symmetric else 'asym'}-damp{args.damp:g}"
    out_dir = args.out or reference.parent
    t0 = time.perf_counter()
    prior = prior_moments(model, sites)
    print(f"prior statistics: {time.perf_counter() - t0:.0f}s "
          f"({sum(not d for _, _, d in prior.values())} of {len(prior)} linear inputs with a dense propagated covariance)")
    real = {}
    roles = {name: lin.role.value for name, lin in sites.linears.items()}
    if any(v.startswith("real") for v in variants):
        ids = calibration_ids(args, reference, tokenizer)
        t0 = time.perf_counter()
        real = cached_real_moments(args.cache, reference, sorted(set(inputs.values())), ids, args.threads)
        print(f"real statistics: {len(ids)} sequences of {args.calib}, {time.perf_counter() - t0:.0f}s")
    outputs, seconds = [], {}
    for variant in variants:
        out = out_dir / f"model.gap-{variant.replace('@', '-at-').replace(',', '+')}-{tag}.onnx"
        with solver_with(hessians(variant, real, prior, inputs, roles), args.damp):
            seconds[variant] = quantize(reference, out, fmt)
        print(f"{variant}: quantized in {seconds[variant]:.0f}s -> {out.name}", flush=True)
        outputs.append(str(out))
    text = eval_quality.load_text(None, args.novel)
    result = eval_quality.evaluate(str(reference), outputs, args.windows, text=text, tokenizer_dir=tokenizer, threads=args.threads, progress=False)
    print(eval_quality.format_table(result))
    summary = {v: {**c, "quantize_seconds": seconds[v]} for v, c in zip(variants, result["candidates"])}
    print(json.dumps({"setting": tag, "calib": f"{args.calib} x {args.calib_windows}", "eval": f"{args.novel} x {args.windows}", "variants": summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
