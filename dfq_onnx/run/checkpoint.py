"""Resumable runs: the finished units' plans in the work directory, and how to pick them up again.

After each unit the pipeline saves that unit's plan (plan.py: arrays and a JSON header) in the
hidden work directory (`.<name>.partial/`), then a manifest that says how many plans are final and
the propagated statistics the next unit starts from. `--resume` applies the saved plans again,
through the same passes as a first run, and continues with the next unit: the finished file is
byte-identical to an uninterrupted run. A plan carries the float weights the exactness check
needs (when the run compares logits), so a resumed run rebuilds the verification mirrors and is
held to the same checks as a first run; a plan that fails its digest stops the run. Nothing here
is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .. import __version__, plan
from ..config import Recipe
from ..quant import stats
from ..report import jsonable

MANIFEST = "checkpoint.json"
FORMAT = 2


def fingerprint(input_path: Path, data_files: set[Path], recipe: Recipe, device: str, threads: int, keep_float: bool) -> str:
    """What the finished units depend on: the input's bytes (graph hashed, data by size and time),
    recipe, device, torch's thread count (threads.py), and whether plans keep the float weights the
    exactness check reads (a run that verifies cannot resume from plans without them)."""
    h = hashlib.sha256()
    h.update(Path(input_path).read_bytes())
    for path in sorted(data_files):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    settings = {
        "recipe": jsonable(dataclasses.asdict(recipe)), "device": device, "threads": threads,
        "keep_float": keep_float, "version": __version__,
    }  # fmt: skip
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclasses.dataclass
class State:
    """How far an unfinished run got."""

    fingerprint: str
    units_done: int = 0
    residual: stats.Moments | None = None  # statistics at the next unit's input


def plan_path(work: Path, index: int) -> Path:
    return work / f"plan-{index:05d}.npz"


def save_plan(work: Path, index: int, unit_plan: plan.UnitPlan, exact_weights: dict[str, np.ndarray]) -> None:
    plan.save(unit_plan, plan_path(work, index), exact_weights)


def load_plan(work: Path, index: int) -> tuple[plan.UnitPlan, dict[str, np.ndarray]]:
    """A finished unit's plan and the float weights it rounded; plan.DamagedPlan, naming the work
    directory, when the file is not what the run wrote."""
    try:
        return plan.load(plan_path(work, index))
    except plan.DamagedPlan as exc:
        raise plan.DamagedPlan(
            f"the unfinished run in {work} cannot be resumed: {exc}; nothing was published. "
            "Run the same command without --resume to start afresh"
        ) from None


def has_plan(work: Path, index: int) -> bool:
    """A plan file is written whole and renamed, so one that exists is finished (a distributed run
    finishes units out of order: those past `units_done` are picked up too)."""
    return plan_path(work, index).is_file()


def plans_kept(work: Path, expected: str) -> int:
    """How many finished units an unfinished run in `work` holds (0 when it cannot be resumed)."""
    state, _ = load(work, expected)
    return 0 if state is None else len(list(work.glob("plan-*.npz")))


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
        return None, "the unfinished run was made from another input, recipe, version or verification mode"
    done = data["units_done"]
    if not all(plan_path(work, i).is_file() for i in range(done)):
        return None, "the unfinished run's plans are incomplete"
    residual = None
    if data.get("residual"):
        blob = work / data["residual"]
        if not blob.is_file():
            return None, "the unfinished run's statistics file is missing"
        with np.load(blob, allow_pickle=False) as arrays:
            residual = stats.Moments(torch.from_numpy(arrays["mean"].copy()), torch.from_numpy(arrays["cov"].copy()))
    return State(fingerprint=expected, units_done=done, residual=residual), None


def save(work: Path, state: State) -> None:
    """Record a finished unit, after its plan is on disk: statistics first, manifest last."""
    done = state.units_done
    name = None
    if state.residual is not None:
        name = f"residual-{done}.npz"
        tmp = work / f"{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, mean=state.residual.mean.cpu().numpy(), cov=state.residual.cov.cpu().numpy())
        os.replace(tmp, work / name)
    manifest = {"format": FORMAT, "fingerprint": state.fingerprint, "units_done": done, "residual": name}
    tmp = work / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, work / MANIFEST)
    for old in work.glob("residual-*.npz"):
        if old.name != name:
            old.unlink()
