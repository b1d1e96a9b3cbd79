"""The method under `--statistics generated` against `propagated` and round-to-nearest, KL to fp32 on a text.

The statistics are what `dfq-onnx optimize --statistics generated` measures on the model's
onnxruntime-genai export (its KV cache: 512-token samples at the recipe's defaults), measured once
and kept in --cache: sampling through the genai folder, moments on the dynamo export (same weights),
then every setting and variant quantizes the dynamo export with them, as the table's other rows do.

  python tools/research/generated_statistics.py --model smollm2 --settings 4:128:asym,3:32:asym --novel persuasion --windows 8
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval_quality  # noqa: E402
import torch  # noqa: E402

from dfq_onnx.config import HessianForm, Method, MethodConfig, Statistics, load_recipe  # noqa: E402
from dfq_onnx.evaluation import models, sampling  # noqa: E402
from dfq_onnx.graph import load  # noqa: E402
from dfq_onnx.graph.sites import find_sites  # noqa: E402
from dfq_onnx.quant import stats  # noqa: E402
from dfq_onnx.run import self_statistics  # noqa: E402
from dfq_onnx.run.pipeline import RunOptions, optimize  # noqa: E402

VARIANTS = {  # name -> changes to the recipe's [method]
    "rtn": {"name": Method.RTN},
    "propagated": {},
    "generated": {"statistics": Statistics.GENERATED},  # the default form: dense where measured
    "generated-diagonal": {"statistics": Statistics.GENERATED, "hessian": HessianForm.DIAGONAL_PLUS_MEAN},
    "generated-damp0.01": {"statistics": Statistics.GENERATED, "gptq_damp": 0.01},
}


def measured_sums(reference: Path, cache: Path, config: MethodConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear input value of `reference`: (E[x], E[x x^T]) on samples of its genai export, cached."""
    if cache.is_file():
        return torch.load(cache)
    genai = reference.parent.parent / "genai"
    sampler = models.load(genai)
    t0 = time.perf_counter()
    ids = sampling.generate(sampler, config.samples, config.sample_length, config.temperature, config.seed, models.bos_token_id(genai))
    print(f"sampled {ids.shape[0]} x {ids.shape[1]} tokens: {time.perf_counter() - t0:.0f}s", flush=True)
    model = load.load_model(reference)
    nodes = {n.name: n for n in model.graph}
    values = sorted(set(self_statistics.linear_inputs(find_sites(model), nodes).values()))
    layout = models.load(reference)
    sums, _ = self_statistics.moments_of(reference, values, ids, (layout.head_dim, layout.windows), None)
    moments = {v: (s1 / ids.size, s2 / ids.size) for v, (s1, s2) in sums.items()}
    torch.save(moments, cache)
    return moments


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2", choices=sorted(eval_quality.realmodel.MODELS))
    p.add_argument("--settings", default="4:128:asym,3:32:asym", help="bits:block:sym|asym, comma-separated")
    p.add_argument("--variants", default="rtn,propagated,generated")
    p.add_argument("--novel", default="persuasion", help="the text of the KL (persuasion: the tuning text; prideprejudice: the report's; shakespeare: another author's)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--cache", type=Path, help="keep the measured statistics here (default: models/gap/<model>-gen64.pt)")
    p.add_argument("--out", type=Path, default=Path("/tmp/generated-statistics"))
    args = p.parse_args(argv)

    reference, tokenizer = eval_quality.model_paths(args.model)
    cache = args.cache or reference.parents[2] / "gap" / f"{args.model}-gen64.pt"
    moments = measured_sums(reference, cache, MethodConfig())

    def cached(input_path, sites, inputs_of, config, threads=None, progress=None):
        by_value = {v: stats.Moments(m, s - torch.outer(m, m)) for v, (m, s) in moments.items()}
        return self_statistics.Measured({lin: by_value[v] for lin, v in inputs_of.items()}, config.samples, config.sample_length,
                                        "cached genai samples", 0.0, 1)  # fmt: skip

    self_statistics.measure = cached
    shakespeare = eval_quality.DEFAULT_DATA_DIR / "shakespeare.txt"  # tools/shakespeare.py: another author than both
    text = eval_quality.load_text(shakespeare, None) if args.novel == "shakespeare" else eval_quality.load_text(None, args.novel)
    args.out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    for setting in args.settings.split(","):
        bits, block, sym = setting.split(":")
        recipe = load_recipe("cafeq-int4-cuda").with_overrides(bits=int(bits), block_size=int(block), symmetric=sym == "sym")
        outputs, seconds = [], []
        for variant in variants:
            out = args.out / f"{args.model}-{bits}-{block}-{sym}-{variant}.onnx"
            t0 = time.perf_counter()
            if not out.exists():
                optimize(reference, out, dataclasses.replace(recipe, method=dataclasses.replace(recipe.method, **VARIANTS[variant])),
                         RunOptions(verify="none"))  # fmt: skip
            seconds.append(time.perf_counter() - t0)
            outputs.append(str(out))
        result = eval_quality.evaluate(str(reference), outputs, args.windows, text=text, tokenizer_dir=tokenizer, progress=False)
        rtn = next((c["kl"] for v, c in zip(variants, result["candidates"]) if v == "rtn"), None)
        for variant, c, s in zip(variants, result["candidates"], seconds):
            ratio = f"  {c['kl'] / rtn:.2f}x rtn" if rtn else ""
            print(f"{args.model} {setting} {variant:20s} {args.novel} x {args.windows}: KL {c['kl']:.4f} top-1 {c['top1']:.4f}"
                  f"  quantize {s:.0f}s{ratio}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
