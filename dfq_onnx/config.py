"""Typed, validated configuration: the quantization format, the method, the recipe.

Everything the optimiser is asked to do is decided here, before any weight is read,
so that bad requests fail fast with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .checks import MAX_SEED, check_seed, check_type, enum_value  # noqa: F401  (MAX_SEED, check_seed: re-exported)
from .errors import DfqError
from .roles import ROLES
from .method_config import (  # noqa: F401  (re-exported: the method's names are the configuration's)
    FREE_TRANSFORMS,
    ONLINE_SITES,
    DiagonalPrior,
    HessianForm,
    Method,
    MethodConfig,
    Prior,
    Rotation,
    Statistics,
    TokenPrior,
    keeps,
    method_config_from,
    parse_online,
    without_learners,
    without_transforms,
)

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


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """Group-wise quantization along K: one scale (and zero point if asymmetric) per block of rows."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        for key, kind in (("bits", int), ("block_size", int), ("symmetric", bool)):
            check_type(getattr(self, key), kind, key)
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


# Roles a recipe may name; an override naming lm_head changes the format its policy (`lm_head`) gives it.


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

    def head_format(self) -> QuantFormat:
        """The lm_head's format: --lm-head's bits on the recipe's blocks, changed only by the
        overrides that name the lm_head (the policy sets its bits)."""
        fmt = QuantFormat(self.lm_head.bits, self.quant.block_size, self.quant.symmetric)
        for override in self.overrides:
            fmt = override.apply(fmt) if "lm_head" in override.roles else fmt
        return fmt

    def site_format(self, role: str, layer: int | None, num_layers: int, head: bool = False) -> QuantFormat:
        """The format one linear is written in: the head's policy, or the recipe's with its overrides."""
        return self.head_format() if head else self.format_for(role, layer, num_layers)

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
            top["output_format"] = enum_value(OutputFormat, top["output_format"], "--format")
        if "lm_head" in top:
            top["lm_head"] = enum_value(LmHeadPolicy, top["lm_head"], "--lm-head")
        method = self.method
        if "method" in top:
            method = dataclasses.replace(method, name=enum_value(Method, top["method"], "--method"))
        if "online" in top:
            method = dataclasses.replace(method, online=parse_online(top.pop("online")))
        if "seed" in top:
            method = dataclasses.replace(method, seed=check_seed(top.pop("seed"), "--seed"))
        if "statistics" in top:
            method = dataclasses.replace(method, statistics=enum_value(Statistics, top.pop("statistics"), "--statistics"))
        if top.pop("fast", False):  # every learner the recipe turns on, off
            method = without_learners(method)
        if "exclude" in top:
            top["exclude"] = self.exclude + parse_names(top["exclude"], "exclude")
        top["method"] = method
        return dataclasses.replace(self, quant=dataclasses.replace(self.quant, **q), **top)


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
    """Load a recipe by built-in name (e.g. 'rtn-int4') or by path to a TOML file.

    An argument that looks like a path (a directory separator, or a .toml ending) must be a file:
    falling back to the built-in recipe of the same stem would run a recipe the user did not write.
    """
    path = Path(name_or_path)
    if not path.is_file():
        recipes = builtin_recipes()
        separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
        if any(s in name_or_path for s in separators) or name_or_path.endswith(".toml"):
            raise DfqError(
                f"recipe file {name_or_path} does not exist: give an existing TOML file or a built-in recipe "
                f"({', '.join(sorted(recipes))})"
            )
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
        ("method", {"name": str, "prior": str, "statistics": str, "diagonal_prior": str, "rotation": str, "hessian": str, "seed": int, "online_block": int,
                    "online_min_gain": float, "alternations": int}),
        ("recipe", {"name": str, "description": str}),
    ):
        for key, kind in types.items():
            if key in data.get(section, {}):
                check_type(data[section][key], kind, f"{source} [{section}] {key}")
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
        output_format=enum_value(OutputFormat, output.get("format", "matmulnbits"), "format"),
        lm_head=enum_value(LmHeadPolicy, output.get("lm_head", "keep"), "lm_head"),
        accuracy_level=int(output.get("accuracy_level", 0)),
        method=method_config_from(method),
    )


def _override(table: dict[str, Any], where: str) -> SiteOverride:
    _check_keys(table, {"roles", "layers", "bits", "block_size", "symmetric"}, where)
    for key, kind in (("bits", int), ("block_size", int), ("symmetric", bool)):
        if key in table:
            check_type(table[key], kind, f"{where} {key}")
    roles, layers = table.get("roles", []), table.get("layers", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not isinstance(layers, list):
        raise DfqError(f"{where}: roles and layers are lists, e.g. roles = [\"down\"], layers = [0, -1]")
    return SiteOverride(tuple(roles), tuple(layers), table.get("bits"), table.get("block_size"), table.get("symmetric"))


def parse_names(value: Any, what: str) -> tuple[str, ...]:
    """A list of names, or one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise DfqError(f"{what} must be node names or roles, as a list or a comma-separated string")
    return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))


def _check_keys(section: dict[str, Any], allowed: set[str], where: str) -> None:
    if unknown := set(section) - allowed:
        raise DfqError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")

