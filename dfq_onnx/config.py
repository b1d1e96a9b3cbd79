"""Typed, validated configuration: the quantization format, the method, the recipe.

Everything the optimiser is asked to do is decided here, before any weight is read,
so that bad requests fail fast with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import enum
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DfqError

SUPPORTED_BITS = (2, 3, 4, 8)
MIN_BLOCK, MAX_BLOCK = 16, 256


class OutputFormat(str, enum.Enum):
    MATMULNBITS = "matmulnbits"  # com.microsoft::MatMulNBits
    QDQ = "qdq"  # DequantizeLinear(blocked) -> MatMul; ORT fuses it at load


class LmHeadPolicy(str, enum.Enum):
    KEEP = "keep"  # leave lm_head and embedding in float
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int | None:
        return {"keep": None, "int8": 8, "int4": 4}[self.value]


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(value: Any, kind: type, what: str) -> None:
    """TOML and Python callers can pass any type: say which key wants which, before it is used."""
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise DfqError(f"{what} must be {_TYPE_NAMES[kind]}, not {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """Group-wise quantization along K: one scale (and zero point if asymmetric) per block of rows."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        for key, kind in (("bits", int), ("block_size", int), ("symmetric", bool)):
            _check_type(getattr(self, key), kind, key)
        if self.bits not in SUPPORTED_BITS:
            raise DfqError(
                f"unsupported --bits {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        bs = self.block_size
        if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
            raise DfqError(
                f"unsupported --block-size {bs}: use a power of two from {MIN_BLOCK} to {MAX_BLOCK}"
            )

    @property
    def container_bits(self) -> int:
        """Bits of the stored code: 3-bit codes live in a 4-bit container (no 3-bit kernel exists)."""
        return 4 if self.bits == 3 else self.bits


class Method(str, enum.Enum):
    RTN = "rtn"  # round-to-nearest, byte-identical to ORT's DEFAULT quantizer
    CAFEQ = "cafeq"  # data-free transforms chosen from the weights, paired transforms, adaptive rounding


class DiagonalPrior(str, enum.Enum):
    """Where the diagonal search may whiten by the prior's per-channel importance (a = h^-alpha/2).

    Whitening trusts the prior channel by channel, and the prior is only as good as its propagation:
    anchored by a post-norm after every sublayer (Gemma 2/3) it follows real activations closely;
    through plain residual sums (Llama, Mistral, Qwen, Phi) it does not (tools/prior_vs_real.py),
    and whitening by it then costs more than it gains. Elsewhere only the weights' spread is used.
    """

    POST_NORM = "post-norm"  # only in layers whose sublayers end in a post-norm
    ALWAYS = "always"
    NEVER = "never"


class Rotation(str, enum.Enum):
    """The orthogonal blocks of the online and V/O transforms."""

    HADAMARD = "hadamard"
    RANDOM = "random"  # seeded random orthogonal blocks: the paper's "Random" baseline (--seed)


class HessianForm(str, enum.Enum):
    """What of the propagated statistics GPTQ rounds under."""

    DIAGONAL_PLUS_MEAN = "diagonal-plus-mean"  # diag(var) + m m^T: O(K) memory, O(K N) GPTQ
    DENSE = "dense"  # the propagated covariance + m m^T: K x K, the off-diagonal terms too


class Prior(str, enum.Enum):
    PROPAGATED = "propagated"  # activation statistics propagated through the network from its weights
    IDENTITY = "identity"  # Sigma = I: plain ||W - W_hat||^2


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The method and its knobs, read by the math itself (quant/); round-to-nearest ignores them."""

    name: Method = Method.CAFEQ
    prior: Prior = Prior.PROPAGATED
    scale_search: bool = True  # per-block clipping / least-squares scales instead of min-max
    diagonal: bool = True  # free diagonal transforms: norm -> q/k/v, norm -> gate/up, up -> down
    diagonal_prior: DiagonalPrior = DiagonalPrior.POST_NORM  # where they may whiten by the prior (see the enum)
    vo_pairs: bool = True  # o rounded to compensate the rounded V of its KV group (alternating)
    vo_transform: bool = True  # free invertible T per KV head on the V/O pair (identity or Hadamard)
    qk_transform: bool = True  # free RoPE-commuting rotations of q/k pairs (no q/k norms)
    gptq: bool = True  # adaptive rounding with error feedback under the prior's Hessian
    gptq_damp: float = 0.3  # GPTQ's H + damp * mean(diag H) * I: less trust in the prior's per-channel values (recipes)
    alternations: int = 2  # V/O rounding steps: V, O given V^, then V given O^ ...
    online: tuple[str, ...] = ("down", "gate_up")  # inputs that may get an online block Hadamard (an inserted op)
    online_block: int = 32  # its largest block size
    online_min_gain: float = 0.05  # kept only where it lowers its linears' proxy by this fraction
    force_transforms: bool = False  # exactness checks: apply every free transform even when it does not pay
    hessian: HessianForm = HessianForm.DIAGONAL_PLUS_MEAN  # the statistics' form GPTQ and the searches use
    rotation: Rotation = Rotation.HADAMARD  # the blocks of the online and V/O transforms
    seed: int = 0  # random blocks (rotation = "random") follow it: the same seed gives the same bytes
    # Learned transforms (quant/learn.py): Adam steps on the straight-through proxy (0: off) and rates.
    learned_diagonal_steps: int = 0  # the norm and up/down diagonals, refined from the searched ones
    learned_diagonal_lr: float = 0.01  # on the log-scales
    learned_vo_steps: int = 0  # a general invertible T per KV head on the V/O pair, from the chosen block
    learned_vo_lr: float = 0.001
    learned_online_steps: int = 0  # general invertible blocks of the online transforms, from the Hadamard
    learned_online_lr: float = 0.001
    learned_qk_steps: int = 0  # the q/k RoPE rotation angle per pair, refined from the searched one (no q/k norms)
    learned_qk_lr: float = 0.01


# Roles a recipe may name; an override naming lm_head changes the format its policy (`lm_head`) gives it.
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "other", "lm_head")


@dataclasses.dataclass(frozen=True)
class SiteOverride:
    """A different format for some sites: those of `roles` (all if empty) in `layers` (all if
    empty; negative counts from the end, -1 the last layer). Later overrides win."""

    roles: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        unknown = [r for r in self.roles if r not in ROLES]
        if unknown:
            raise DfqError(f"override roles {unknown}: choose from {', '.join(ROLES)}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise DfqError(f"override layers must be integers (negative from the end), not {list(self.layers)!r}")
        if self.bits is None and self.block_size is None and self.symmetric is None:
            raise DfqError("an override sets nothing: give bits, block_size or symmetric")
        self.apply(QuantFormat())  # validates the values

    def matches(self, role: str, layer: int | None, num_layers: int) -> bool:
        if self.roles and role not in self.roles:
            return False
        if not self.layers:
            return True
        return layer is not None and any(layer == (i if i >= 0 else num_layers + i) for i in self.layers)

    def apply(self, fmt: QuantFormat) -> QuantFormat:
        values = {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}
        return dataclasses.replace(fmt, **{k: v for k, v in values.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A complete request: what to produce and how to optimise it."""

    name: str = "custom"
    description: str = ""
    quant: QuantFormat = QuantFormat()
    output_format: OutputFormat = OutputFormat.MATMULNBITS
    lm_head: LmHeadPolicy = LmHeadPolicy.KEEP
    method: MethodConfig = MethodConfig()
    accuracy_level: int = 0
    float_output: bool = False  # apply the method's free transforms but keep float weights (--bits 16)
    overrides: tuple[SiteOverride, ...] = ()  # per-role / per-layer formats
    exclude: tuple[str, ...] = ()  # linears kept in float: node names or roles

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise DfqError(f"unsupported accuracy level {self.accuracy_level}: use 0 to 4")

    def format_for(self, role: str, layer: int | None, num_layers: int) -> QuantFormat:
        """The format of one site: the recipe's, changed by every override that matches it."""
        fmt = self.quant
        for override in self.overrides:
            if override.matches(role, layer, num_layers):
                fmt = override.apply(fmt)
        return fmt

    def excludes(self, node: str, role: str) -> bool:
        return node in self.exclude or role in self.exclude

    def with_overrides(self, **overrides: Any) -> "Recipe":
        """Apply CLI flags (None means 'not given') on top of the recipe."""
        quant_keys = {"bits", "block_size", "symmetric"}
        if overrides.get("bits") == 16:  # float output: transforms planned for the recipe's own grid, weights stay float
            overrides = {**overrides, "bits": None, "float_output": True}
        q = {k: v for k, v in overrides.items() if k in quant_keys and v is not None}
        top = {k: v for k, v in overrides.items() if k not in quant_keys and v is not None}
        if "output_format" in top:
            top["output_format"] = _enum(OutputFormat, top["output_format"], "--format")
        if "lm_head" in top:
            top["lm_head"] = _enum(LmHeadPolicy, top["lm_head"], "--lm-head")
        method = self.method
        if "method" in top:
            method = dataclasses.replace(method, name=_enum(Method, top["method"], "--method"))
        if "online" in top:
            method = dataclasses.replace(method, online=parse_online(top.pop("online")))
        if "seed" in top:
            method = dataclasses.replace(method, seed=check_seed(top.pop("seed"), "--seed"))
        if top.pop("fast", False):  # every learner the recipe turns on, off
            method = dataclasses.replace(method, learned_diagonal_steps=0, learned_vo_steps=0, learned_online_steps=0, learned_qk_steps=0)
        if "exclude" in top:
            top["exclude"] = self.exclude + parse_names(top["exclude"], "exclude")
        top["method"] = method
        return dataclasses.replace(self, quant=dataclasses.replace(self.quant, **q), **top)


def _enum(kind: type[enum.Enum], value: Any, what: str) -> Any:
    if isinstance(value, kind):
        return value
    try:
        return kind(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise DfqError(f"unknown {what} '{value}': choose one of {choices}") from None


DEFAULT_RECIPE = "cafeq-int4-cuda"  # what `dfq-onnx optimize` does without --recipe


def builtin_recipes() -> dict[str, Path]:
    """Recipes shipped in passes/recipes/ (installed as dfq_onnx.passes/recipes)."""
    found: dict[str, Path] = {}
    root = resources.files("dfq_onnx.passes").joinpath("recipes")
    for entry in root.iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name[: -len(".toml")]] = Path(str(entry))
    return found


def load_recipe(name_or_path: str) -> Recipe:
    """Load a recipe by built-in name (e.g. 'rtn-int4') or by path to a TOML file."""
    path = Path(name_or_path)
    if not path.is_file():
        recipes = builtin_recipes()
        stem = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
        if stem not in recipes:
            raise DfqError(
                f"recipe '{name_or_path}' not found: give a TOML path or one of {', '.join(sorted(recipes))}"
            )
        path = recipes[stem]
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DfqError(f"cannot read recipe {path}: {exc}") from None
    return recipe_from_dict(data, source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    known = {"recipe", "quant", "output", "method", "override"}
    unknown = set(data) - known
    if unknown:
        raise DfqError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(known)}")
    meta = data.get("recipe", {})
    quant = data.get("quant", {})
    output = data.get("output", {})
    method = data.get("method", {})
    _check_keys(quant, {"bits", "block_size", "symmetric", "exclude"}, f"{source} [quant]")
    _check_keys(output, {"format", "lm_head", "accuracy_level"}, f"{source} [output]")
    _check_keys(method, {f.name for f in dataclasses.fields(MethodConfig)}, f"{source} [method]")
    for section, types in (
        ("quant", {"bits": int, "block_size": int, "symmetric": bool}),
        ("output", {"format": str, "lm_head": str, "accuracy_level": int}),
        ("method", {"name": str, "prior": str, "diagonal_prior": str, "rotation": str, "hessian": str, "seed": int, "online_block": int,
                    "online_min_gain": float, "alternations": int}),
        ("recipe", {"name": str, "description": str}),
    ):
        for key, kind in types.items():
            if key in data.get(section, {}):
                _check_type(data[section][key], kind, f"{source} [{section}] {key}")
    overrides = data.get("override", [])
    if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
        raise DfqError(f"{source}: overrides are tables: [[override]] with roles, layers, bits, block_size, symmetric")
    exclude = parse_names(quant.get("exclude", ()), f"{source} [quant] exclude")
    return Recipe(
        name=meta.get("name", Path(source).stem),
        description=meta.get("description", ""),
        quant=QuantFormat(**{k: v for k, v in quant.items() if k != "exclude"}),
        overrides=tuple(_override(o, f"{source} [[override]]") for o in overrides),
        exclude=exclude,
        output_format=_enum(OutputFormat, output.get("format", "matmulnbits"), "format"),
        lm_head=_enum(LmHeadPolicy, output.get("lm_head", "keep"), "lm_head"),
        accuracy_level=int(output.get("accuracy_level", 0)),
        method=_method_config(method),
    )


def _override(table: dict[str, Any], where: str) -> SiteOverride:
    _check_keys(table, {"roles", "layers", "bits", "block_size", "symmetric"}, where)
    for key, kind in (("bits", int), ("block_size", int), ("symmetric", bool)):
        if key in table:
            _check_type(table[key], kind, f"{where} {key}")
    roles, layers = table.get("roles", []), table.get("layers", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not isinstance(layers, list):
        raise DfqError(f"{where}: roles and layers are lists, e.g. roles = [\"down\"], layers = [0, -1]")
    return SiteOverride(tuple(roles), tuple(layers), table.get("bits"), table.get("block_size"), table.get("symmetric"))


MAX_SEED = 2**31 - 1


def check_seed(value: Any, what: str) -> int:
    _check_type(value, int, what)
    if not 0 <= value <= MAX_SEED:
        raise DfqError(f"{what} {value} is out of range: use 0 to {MAX_SEED}")
    return value


def parse_names(value: Any, what: str) -> tuple[str, ...]:
    """A list of names, or one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise DfqError(f"{what} must be node names or roles, as a list or a comma-separated string")
    return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))


def _method_config(section: dict[str, Any]) -> MethodConfig:
    values = dict(section)
    values["name"] = _enum(Method, values.get("name", Method.CAFEQ.value), "method")
    if "prior" in values:
        values["prior"] = _enum(Prior, values["prior"], "method prior")
    if "rotation" in values:
        values["rotation"] = _enum(Rotation, values["rotation"], "method rotation")
    if "hessian" in values:
        values["hessian"] = _enum(HessianForm, values["hessian"], "method hessian")
    if "seed" in values:
        check_seed(values["seed"], "recipe [method] seed")
    if "diagonal_prior" in values:
        values["diagonal_prior"] = _enum(DiagonalPrior, values["diagonal_prior"], "method diagonal_prior")
    for key in ("scale_search", "diagonal", "vo_pairs", "vo_transform", "qk_transform", "gptq", "force_transforms"):
        if key in values and not isinstance(values[key], bool):
            raise DfqError(f"recipe [method] {key} must be true or false")
    if "online" in values:
        values["online"] = parse_online(values["online"])
    if "online_block" in values and (not isinstance(b := values["online_block"], int) or b < 8 or b & (b - 1)):
        raise DfqError(f"recipe [method] online_block must be a power of two >= 8, not {b!r}")
    if "alternations" in values and not 1 <= values["alternations"] <= 16:
        raise DfqError(f"recipe [method] alternations must be from 1 to 16, not {values['alternations']}")
    for key in ("learned_diagonal_steps", "learned_vo_steps", "learned_online_steps", "learned_qk_steps"):
        if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or not 0 <= values[key] <= 10_000):
            raise DfqError(f"recipe [method] {key} must be a whole number of steps from 0 (off) to 10000, not {values[key]!r}")
    for key in ("learned_diagonal_lr", "learned_vo_lr", "learned_online_lr", "learned_qk_lr", "gptq_damp"):
        if key in values and (not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or not values[key] > 0):
            raise DfqError(f"recipe [method] {key} must be a positive number (e.g. {getattr(MethodConfig, key)}), not {values[key]!r}")
    if "online_min_gain" in values and not isinstance(values["online_min_gain"], (int, float)):
        raise DfqError("recipe [method] online_min_gain must be a number (a fraction, e.g. 0.05)")
    return MethodConfig(**values)


ONLINE_SITES = ("down", "gate_up")


def parse_online(value: Any) -> tuple[str, ...]:
    """Where online rotations may go: a list, or a comma-separated string ("none" for nowhere)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip() and str(i).strip() != "none"]
    if unknown := [i for i in items if i not in ONLINE_SITES]:
        raise DfqError(f"unknown online site(s) {unknown}: choose from {', '.join(ONLINE_SITES)}, or none")
    return tuple(dict.fromkeys(items))


def _check_keys(section: dict[str, Any], allowed: set[str], where: str) -> None:
    if unknown := set(section) - allowed:
        raise DfqError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")

