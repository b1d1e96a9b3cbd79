"""The settings a user gives on top of a recipe, written once: the CLI's flags, the API's keyword
check and Olive's pass parameters are generated from these tables (a new option is one entry here
and the code that reads it from the recipe).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from ..config import ROLES, SUPPORTED_BITS, LmHeadPolicy, Method, OutputFormat, Statistics


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the API keyword, the recipe override and Olive's parameter
    type_: Any  # the Python type Olive declares (None always means "the recipe's value")
    help: str
    default: str = ""  # what the CLI's help shows as the default, in brackets
    flag: str = ""  # the CLI flag, when not --<name with dashes>
    arg: dict = dataclasses.field(default_factory=dict)  # argparse's type, choices, metavar, action
    negative: tuple[str, str] | None = None  # a boolean's second flag (setting False) and its help

    def add_to(self, parser) -> None:
        """This option as argparse flag(s) on `parser` (a parser or an argument group)."""
        text = self.help.replace("%", "%%") + (f" [{self.default}]" if self.default else "")
        if self.negative is None:
            parser.add_argument(self.flag or f"--{self.name.replace('_', '-')}", dest=self.name, default=None, help=text, **self.arg)
            return
        both = parser.add_mutually_exclusive_group()
        both.add_argument(f"--{self.name}", dest=self.name, action="store_true", default=None, help=text)
        both.add_argument(self.negative[0], dest=self.name, action="store_false", help=self.negative[1])


RECIPE_OPTIONS = (
    Option("bits", Optional[int], f"bits per weight: {', '.join(map(str, SUPPORTED_BITS))} (3 is stored in 4-bit containers) [4]; "
           "16 writes float weights with the method's free transforms applied (an exactness check)", arg={"type": int}),  # fmt: skip
    Option("block_size", Optional[int], "rows of K per scale: a power of two, 16..256", "32", arg={"type": int}),
    Option("symmetric", Optional[bool], "no zero points", "default", negative=("--asymmetric", "per-block uint8-packed zero points")),
    Option("output_format", Optional[str], "MatMulNBits nodes, or DequantizeLinear->MatMul (QDQ, ORT fuses it at load)", "matmulnbits",
           flag="--format", arg={"choices": [f.value for f in OutputFormat]}),  # fmt: skip
    Option("lm_head", Optional[str], "lm_head and embedding (kept consistent when tied): keep float, or quantize", "keep",
           arg={"choices": [p.value for p in LmHeadPolicy]}),  # fmt: skip
    Option("method", Optional[str], "how weights are rounded: cafeq (the data-free method) or rtn (round-to-nearest)", "cafeq",
           arg={"choices": [m.value for m in Method]}),  # fmt: skip
    Option("statistics", Optional[str], "what weighs each rounding error: statistics propagated from the weights (the paper's), "
           "or measured on sequences the model samples itself from its weights (no text read; slower: a sampling pass first)",
           "propagated", arg={"choices": [s.value for s in Statistics]}),  # fmt: skip
    Option("online", Optional[Union[str, list[str]]], "inputs that may get an online block Hadamard rotation (an inserted op, kept "
           "only where it lowers the proxy by 5%): down, gate_up, both comma-separated, or none", "down,gate_up"),  # fmt: skip
    Option("exclude", Optional[list[str]], "linears kept in float, comma-separated: node names (as `dfq-onnx inspect` lists "
           f"them) or roles ({', '.join(ROLES)}); per-role and per-layer bits go in a recipe's [[override]] tables"),  # fmt: skip
    Option("accuracy_level", Optional[int], "MatMulNBits accuracy_level (0 unset, 4 = int8 activations on CPU); QDQ output records it "
           "in the model's metadata, for the session option session.qdq_matmulnbits_accuracy_level", "0", arg={"type": int}),  # fmt: skip
    Option("seed", Optional[int], "seed of the random orthogonal blocks of --recipe random-rotation (the paper's Random baseline) and of "
           "the samples of --statistics generated; the same seed gives the same bytes", "0", arg={"type": int}),  # fmt: skip
    Option("fast", Optional[bool], "turn off every learned transform the recipe turns on (the bundled recipes learn none: they are "
           "the fast setting already; a recipe with learners takes 2-6x longer, see BENCHMARKS.md)", "off", arg={"action": "store_true"}),  # fmt: skip
)

# A size budget instead of one format (budget.py): a format per linear.
BUDGET_OPTIONS = (
    Option("target_bits", Optional[float], "stored bits per quantized weight (codes, scales and zero points, as the report counts "
           "them), e.g. 3.5", arg={"type": float, "metavar": "B"}),  # fmt: skip
    Option("target_size", Optional[Union[int, str]], "bytes of the written model, e.g. 1.5GB, 800MiB", arg={"metavar": "SIZE"}),
    Option("target_formats", Optional[str], "candidate formats as bits:block:sym|asym, comma-separated, e.g. "
           "2:64:asym,4:128:asym,8:128:sym", "2-, 4- and 8-bit at blocks 32/64/128, symmetric and asymmetric; with a CUDA-layout "
           "recipe (the default) only the layouts ORT's CUDA GEMM runs: 2:64:sym, 4:32:sym, 8:32:sym", arg={"metavar": "LIST"}),  # fmt: skip
    Option("target_weighting", Optional[str], "how a linear's relative error counts: times its role's measured KL per unit of error "
           "(it tracks each linear's measured KL best), or times the share of the residual stream its sublayer writes", "relative",
           arg={"choices": ["relative", "residual"]}),  # fmt: skip
)


def recipe_overrides(values) -> dict[str, Any]:
    """The recipe options of `values` (argparse's namespace or Olive's config), by name."""
    return {o.name: getattr(values, o.name) for o in RECIPE_OPTIONS}


def budget_settings(values) -> dict[str, Any]:
    """The budget options of `values`, by name; the weighting's default where none was given."""
    out = {o.name: getattr(values, o.name) for o in BUDGET_OPTIONS}
    out["target_weighting"] = out["target_weighting"] or "relative"
    return out
