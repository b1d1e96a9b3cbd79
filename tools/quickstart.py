#!/usr/bin/env python3
"""The README's first command: build the real default model if absent, quantize it, show the result.

    python tools/quickstart.py                          # Gemma 3 270M fp32 genai folder, recipe cafeq-int4-cuda
    python tools/quickstart.py --recipe cafeq-int3 --windows 4

The model is the onnxruntime-genai folder of Gemma 3 270M; the output is a folder onnxruntime-genai
loads. After quantizing, the quality of the model it just wrote is measured on a few windows of
real text (Pride and Prejudice) next to round-to-nearest at the same format: perplexity, KL to the
fp32 model and top-1 agreement, all through ONNX Runtime. Then onnxruntime-genai completes one
prompt, greedily, with the original model and with the quantized one.
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

FOLDER = REPO / "models" / "gemma3-270m" / "genai"
PROMPT = "The best thing about a quiet morning is"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cafeq-int4-cuda", help="built-in recipe name or TOML path (default: cafeq-int4-cuda)")
    parser.add_argument("--windows", type=int, default=2, help="text windows for the quality check (0 to skip; default 2)")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens in the generated sentences (default 24)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    print("== building the real default model (skipped when already built)", flush=True)
    if build_gemma3_270m.main(["--styles", "genai"]) != 0:
        return 1

    from dfq_onnx.front.cli import main as dfq
    from dfq_onnx.config import load_recipe

    recipe = load_recipe(args.recipe)
    output = FOLDER.with_name(f"genai-{recipe.name}")
    print(f"\n== dfq-onnx optimize {FOLDER.relative_to(REPO)} -o {output.relative_to(REPO)} --recipe {args.recipe}", flush=True)
    code = dfq(["optimize", str(FOLDER), "-o", str(output), "--recipe", args.recipe])
    if code != 0:
        return code

    if args.windows > 0:
        q = recipe.quant
        rtn = FOLDER.with_name(f"genai-rtn-{q.bits}b-g{q.block_size}-{'sym' if q.symmetric else 'asym'}")
        fmt = ["--bits", str(q.bits), "--block-size", str(q.block_size), "--symmetric" if q.symmetric else "--asymmetric"]
        print(f"\n== round-to-nearest at the same format, for comparison: {rtn.relative_to(REPO)}", flush=True)
        code = dfq(["optimize", str(FOLDER), "-o", str(rtn), "--method", "rtn", "--verify", "none", "--quiet", *fmt])
        if code != 0:
            return code

        import eval_quality

        print(f"\n== quality on {args.windows} windows of Pride and Prejudice (ONNX Runtime, CPU)", flush=True)
        models = [str(output / "model.onnx"), str(rtn / "model.onnx")]
        result = eval_quality.evaluate(str(FOLDER / "model.onnx"), models, args.windows, progress=False)
        print(eval_quality.format_table(result))

    print(f"\n== onnxruntime-genai, greedy, {args.tokens} new tokens", flush=True)
    for label, folder in (("fp32", FOLDER), (recipe.name, output)):
        print(f"{label:>16}: {generate(folder, PROMPT, args.tokens)}", flush=True)
    return 0


def generate(folder: Path, prompt: str, tokens: int) -> str:
    """The prompt and its greedy completion by the genai folder (BOS first, as Gemma was trained)."""
    import json

    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    ids = [int(t) for t in tokenizer.encode(prompt)]
    bos = json.loads((folder / "genai_config.json").read_text())["model"].get("bos_token_id")
    if isinstance(bos, int) and ids[:1] != [bos]:  # this tokenizer does not add it
        ids.insert(0, bos)
    text = tokenizer.decode(greedy(model, ids, tokens))  # the whole sequence: decoding the tail alone drops its first space
    return " ".join(text.split())  # one line


def greedy(model, ids: list[int], tokens: int) -> list[int]:
    """`ids` and `tokens` greedy continuations by an onnxruntime_genai.Model."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([ids])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


if __name__ == "__main__":
    sys.exit(main())
