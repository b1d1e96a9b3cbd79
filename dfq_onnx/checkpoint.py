"""Resumable runs: what finished layers left in the work directory, and how to pick it up again.

After each layer the pipeline has appended that layer's tensors to the output's data file in
the hidden work directory (`.<name>.partial/`). A checkpoint records, atomically, how far the
data file is valid, the tensors in it, the graph edits that use them, the per-site results
and the propagated statistics the next layer starts from. `--resume` replays those edits
instead of recomputing them and continues writing at the recorded offset, so the finished
file is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from . import __version__
from .config import Recipe
from .report import SiteResult, _jsonable

MANIFEST = "checkpoint.json"
FORMAT = 1


def fingerprint(input_path: Path, data_files: set[Path], recipe: Recipe, device: str, seed: int) -> str:
    """What the finished layers depend on: the input's bytes (graph hashed, data by size and time), recipe, seed."""
    h = hashlib.sha256()
    h.update(Path(input_path).read_bytes())
    for path in sorted(data_files):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    settings = {"recipe": _jsonable(dataclasses.asdict(recipe)), "device": device, "seed": seed, "version": __version__}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclasses.dataclass
class State:
    """Everything a resumed run needs from the layers that finished."""

    fingerprint: str
    units_done: int = 0
    data_offset: int = 0
    tensors: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # name -> where in the data file
    actions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # graph edits, in order
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    residual: Any = None  # stats.Moments at the next layer's input (or None)
    rng: torch.Tensor | None = None

    def site_results(self) -> list[SiteResult]:
        return [SiteResult(**r) for r in self.results]

    def tensor(self, name: str, directory: Path, location: str) -> ir.ExternalTensor:
        t = self.tensors[name]
        return ir.ExternalTensor(
            location,
            offset=t["offset"],
            length=t["length"],
            dtype=ir.DataType(t["dtype"]),
            shape=ir.Shape(t["shape"]),
            name=name,
            base_dir=str(directory),
        )


def record_tensor(state: State, tensor: ir.ExternalTensor) -> None:
    state.tensors[tensor.name] = {
        "offset": tensor.offset,
        "length": tensor.length,
        "dtype": int(tensor.dtype),
        "shape": [int(d) for d in tensor.shape],
    }


def load(work: Path, expected: str) -> tuple[State | None, str | None]:
    """The state left in `work`, or None with the reason it cannot be used."""
    manifest = work / MANIFEST
    if not manifest.is_file():
        return None, "no unfinished run was found"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None, "the unfinished run's checkpoint is unreadable"
    if data.get("format") != FORMAT or data.get("fingerprint") != expected:
        return None, "the unfinished run was made from another input, recipe, seed or version"
    done = data["units_done"]
    blob = work / f"residual-{done}.pt"
    if not blob.is_file():
        return None, "the unfinished run's statistics file is missing"
    saved = torch.load(blob, weights_only=False)
    state = State(
        fingerprint=expected,
        units_done=done,
        data_offset=data["data_offset"],
        tensors=data["tensors"],
        actions=data["actions"],
        results=data["results"],
        notes=data["notes"],
        residual=saved["residual"],
        rng=saved["rng"],
    )
    return state, None


def save(work: Path, state: State) -> None:
    """Write the checkpoint after the data it describes is on disk: statistics first, manifest last."""
    done = state.units_done
    blob = work / f"residual-{done}.pt"
    tmp = blob.with_suffix(".tmp")
    torch.save({"residual": state.residual, "rng": state.rng}, tmp)
    os.replace(tmp, blob)
    manifest = {
        "format": FORMAT,
        "fingerprint": state.fingerprint,
        "units_done": done,
        "data_offset": state.data_offset,
        "tensors": state.tensors,
        "actions": state.actions,
        "results": state.results,
        "notes": state.notes,
    }
    tmp = work / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, work / MANIFEST)
    for old in work.glob("residual-*.pt"):
        if old != blob:
            old.unlink()

