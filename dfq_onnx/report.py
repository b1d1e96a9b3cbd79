"""What a run did, per site and per role: kept as data (JSON beside the output) and as a table."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .config import Recipe
from .graph.sites import ModelSites
from .roles import ROLES


@dataclasses.dataclass
class SiteResult:
    name: str
    role: str
    layer: int | None
    k: int
    n: int
    bits: int
    container_bits: int
    block_size: int
    symmetric: bool
    scale_bits: int
    # The method's proxy of the written weights relative to that of the float ones (tr(D^T H D) /
    # tr(W^T H W) under the propagated statistics; the V/O pair's product error for v and o); for
    # round-to-nearest and the lm_head, ||W - W_hat||^2 / ||W||^2.
    rel_error: float
    rtn_rel_error: float  # the same measure for round-to-nearest at this format
    seconds: float
    transforms: list[str]
    # Why ORT's fast CUDA GEMM kernel would not run this linear (fast_path.py); empty when it does.
    cuda_gemm_misses: list[str] = dataclasses.field(default_factory=list)

    @property
    def cuda_fast_path(self) -> bool:
        return not self.cuda_gemm_misses and "excluded" not in self.transforms

    @property
    def weights(self) -> int:
        return self.k * self.n

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: container codes plus scale (and zero point) per block."""
        return stored_bits(self.container_bits, self.block_size, self.symmetric, self.k, 1, self.scale_bits) / self.k


def stored_bits(container_bits: int, block_size: int, symmetric: bool, k: int, n: int, scale_bits: int) -> float:
    """Bits of a quantized W[K, N] as the report counts them: container codes, scales, zero points per block."""
    blocks = -(-k // block_size)
    extra = scale_bits + (0 if symmetric else container_bits)
    return float(n * blocks * (container_bits * block_size + extra))


@dataclasses.dataclass
class RoleSummary:
    role: str
    count: int
    shape: str
    bits_per_weight: float
    rel_error: float
    rtn_rel_error: float
    seconds: float
    transforms: str


@dataclasses.dataclass
class Report:
    input: str
    output: str
    recipe: dict[str, Any]
    structure: dict[str, Any]
    sites: list[SiteResult]
    seconds: float
    notes: list[str]
    verification: dict[str, Any] | None = None
    resumed_units: int = 0  # layers taken from an interrupted run's checkpoint (--resume)
    online: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # inserted rotations: nodes, k, block, layer
    distributed: dict[str, Any] | None = None  # a Ray run: the cluster, threads per task, the node each unit ran on
    allocation: dict[str, Any] | None = None  # a size budget: the format chosen per site, estimated and written bits

    @classmethod
    def build(
        cls,
        input_path: Path,
        output_path: Path,
        recipe: Recipe,
        sites: ModelSites,
        results: list[SiteResult],
        seconds: float,
        notes: list[str],
    ) -> "Report":
        return cls(
            input=str(input_path),
            output=str(output_path),
            recipe=jsonable(dataclasses.asdict(recipe)),
            structure=structure_summary(sites),
            sites=results,
            seconds=seconds,
            notes=list(dict.fromkeys(notes)),
        )

    def by_role(self) -> list[RoleSummary]:
        groups: dict[str, list[SiteResult]] = defaultdict(list)
        for site in self.sites:
            groups[site.role].append(site)
        rows = []
        for role in sorted(groups, key=lambda r: ROLES.index(r) if r in ROLES else 99):
            items = groups[role]
            weights = sum(s.weights for s in items)
            shapes = sorted({f"{s.k}x{s.n}" for s in items})
            rows.append(
                RoleSummary(
                    role=role,
                    count=len(items),
                    shape=shapes[0] if len(shapes) == 1 else "mixed",
                    bits_per_weight=sum(s.bits_per_weight * s.weights for s in items) / weights,
                    rel_error=sum(s.rel_error for s in items) / len(items),
                    rtn_rel_error=sum(s.rtn_rel_error for s in items) / len(items),
                    seconds=sum(s.seconds for s in items),
                    transforms=",".join(sorted({t for s in items for t in s.transforms})) or "-",
                )
            )
        return rows

    def totals(self) -> dict[str, float]:
        weights = sum(s.weights for s in self.sites) or 1
        return {
            "linears": len(self.sites),
            "weights": weights,
            "bits_per_weight": sum(s.bits_per_weight * s.weights for s in self.sites) / weights,
            "rel_error": sum(s.rel_error for s in self.sites) / max(len(self.sites), 1),
            "rtn_rel_error": sum(s.rtn_rel_error for s in self.sites) / max(len(self.sites), 1),
            "cuda_fast_path_sites": sum(s.cuda_fast_path for s in self.sites),
        }

    def online_cost(self) -> dict[str, Any]:
        """What the inserted rotations cost per token: K * b multiply-adds each, against the linears' K * N."""
        macs = sum(r["k"] * r["block"] for r in self.online)
        linear = sum(s.weights for s in self.sites) or 1
        return {"rotations": len(self.online), "macs_per_token": macs, "fraction_of_linears": macs / linear}

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "recipe": self.recipe,
            "structure": self.structure,
            "seconds": self.seconds,
            "totals": self.totals(),
            "roles": [dataclasses.asdict(r) for r in self.by_role()],
            "sites": [dataclasses.asdict(s) | {"bits_per_weight": s.bits_per_weight, "cuda_fast_path": s.cuda_fast_path} for s in self.sites],
            "verification": self.verification,
            "resumed_units": self.resumed_units,
            "online": {**self.online_cost(), "inserted": self.online},
            "distributed": self.distributed,
            "allocation": self.allocation,
            "notes": self.notes,
        }

    def write_json(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)


def structure_summary(sites: ModelSites) -> dict[str, Any]:
    """What the matcher found, in plain data (for `inspect --json` and the report)."""
    return {
        "style": sites.style,
        "vocab": sites.vocab,
        "layers": len(sites.layers()),
        "lm_head": sites.lm_head,
        "embedding": dataclasses.asdict(sites.embedding) if sites.embedding else None,
        "attention": [jsonable(dataclasses.asdict(a)) for a in sites.attentions],
        "mlp": [jsonable(dataclasses.asdict(m)) for m in sites.mlps],
        "linears": [
            {
                "name": lin.node,
                "role": lin.role.value,
                "layer": lin.layer,
                "k": lin.k,
                "n": lin.n,
                "weight": lin.weight.initializer,
                "transposed": lin.weight.transposed,
                "dtype": lin.weight.dtype,
            }
            for lin in sites.linears.values()
        ],
        "pairs": [dataclasses.asdict(p) for p in sites.pairs()],
        "unmatched": sites.unmatched,
        "notes": sites.notes,
    }


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj
