"""A run, from the input path to a published, verified model and its report.

It strings the parts together and holds no math and no format: the units (units.py) are planned
one after the other (planner.plan_unit, or Ray's tasks through distributed.py), each plan is saved
(the checkpoint), applied by the passes into the output's data file and followed by the float
mirrors; then ONNX Runtime checks the written model (verify.py) before it is published and the
report is written. Peak memory follows the largest layer, not the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import onnx_ir as ir

from .. import memory, methods, threads
from ..config import ROLES, OutputFormat, Recipe, Statistics
from ..errors import DfqError, Interrupted, Resumable
from ..graph import load, save
from ..graph.sites import ModelSites, find_sites
from ..graph.store import TensorStore
from ..passes.apply import apply_plan, finish
from ..passes.context import PlanContext
from ..passes.online_rotation import rotation_name
from ..plan import DamagedPlan, UnitPlan
from ..progress import ProgressFn
from ..quant import stats
from ..report import Report
from . import budget, checkpoint, distributed, mirror, planner, prior, self_statistics
from .mirror import Mirror
from .units import all_units
from .verify import VerificationFailed
from .weights import WeightReader


@dataclasses.dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    verify: str = "auto"  # "compare" logits with the input, "run" the output only, "none"; "auto": by size
    resume: bool = False  # continue an interrupted run from its last finished layer
    threads: int | None = None  # torch threads of the optimisation (the bytes depend on it); None: torch's
    ray: distributed.Settings | None = None  # spread the units over a Ray cluster (distributed.py)
    budget: budget.Budget | None = None  # choose a format per linear within this size (budget.py)

    def __post_init__(self) -> None:
        if self.verify not in ("auto", "compare", "run", "none"):
            raise DfqError(f"unknown verify mode '{self.verify}': use auto, compare, run or none")


def output_suffix(recipe: Recipe) -> str:
    """What names an output by its recipe: q4, qdq3, or float (--bits 16 writes float weights)."""
    if recipe.float_output:
        return "float"
    return f"{'qdq' if recipe.output_format == OutputFormat.QDQ else 'q'}{recipe.quant.bits}"


def default_output_path(input_path: Path, recipe: Recipe) -> Path:
    """<model>.<suffix>.onnx beside the input (a genai folder's default is <folder>-<suffix>/)."""
    return input_path.with_name(f"{input_path.stem}.{output_suffix(recipe)}.onnx")


def inspect(input_path: Path) -> ModelSites:
    return find_sites(load.load_model(input_path))


def optimize(
    input_path: Path,
    output_path: Path,
    recipe: Recipe,
    options: RunOptions = RunOptions(),
    progress: ProgressFn | None = None,
    companions: dict[str, Path | bytes] | None = None,
) -> Report:
    """Quantize `input_path` into `output_path`; `companions` (file name -> source file or bytes) are
    published beside the output with it (an onnxruntime-genai folder's config and tokenizer)."""
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    model = load.load_model(input_path)
    check_weight_types(model)
    save.check_output_path(output_path, input_path, load.external_data_files(model))
    sites = find_sites(model)
    check_exclude(recipe, sites)
    if load.weight_bytes(model) <= verify_auto_limit():  # larger models are checked as each weight is read
        load.check_finite(model, _float_tensors(sites))
    options = dataclasses.replace(options, threads=threads.use(options.threads))
    with save.OutputLock(output_path):
        allocation = None
        if options.budget is not None:  # the formats become per-site overrides: the checkpoint's key covers them
            allocation = budget.choose_formats(model, sites, recipe, options.budget, options.device, progress, input_path.stat().st_size)
            recipe = dataclasses.replace(recipe, overrides=recipe.overrides + allocation.overrides())
        try:
            return _optimize(model, sites, input_path, output_path, recipe, options, progress, started, companions or {}, allocation)
        except OSError as exc:  # the disk, not the model: one line, nothing published
            raise save.write_error(exc, output_path) from None


def _float_tensors(sites: ModelSites) -> list[str]:
    """Every initializer the method reads: linear weights, norm gains, biases, the embedding."""
    names = [lin.weight.initializer for lin in sites.linears.values()] + [b for lin in sites.linears.values() if (b := lin.bias)]
    norms = [a.input_norm for a in sites.attentions] + [a.output_norm for a in sites.attentions]
    norms += [m.input_norm for m in sites.mlps] + [m.output_norm for m in sites.mlps]
    names += [g.initializer for g in norms if g is not None]
    if sites.embedding:
        names.append(sites.embedding.initializer)
    return list(dict.fromkeys(names))


def _optimize(model, sites, input_path, output_path, recipe, options, progress, started, companions, allocation=None) -> Report:
    work = save.work_dir_for(output_path)
    location = save.data_location_for(output_path)
    verify_mode, unverified_why = _verify_mode(options.verify, model)  # sized on the input's weights
    mirror_names = _mirror_names(recipe, verify_mode)
    keep_float = "exact" in mirror_names  # the plans keep the float weights the exactness check reads
    key = checkpoint.fingerprint(input_path, load.external_data_files(model), recipe, options.device, options.threads, keep_float)
    state, notes = _start(work, key, options.resume)
    writer = save.ExternalDataWriter(work, location)  # a resumed run writes its finished plans again
    units = all_units(sites, model.graph, recipe)
    total = sum(len(u.linears) for u in units)  # progress counts linears (sites)
    resumed = state.units_done
    mirrors: dict[str, Mirror] = {}
    plans: list[UnitPlan] = []
    context = PlanContext(sites, TensorStore(model.graph, writer), recipe.accuracy_level)
    cluster = distributed.Cluster(options.ray, options.threads) if options.ray else contextlib.nullcontext()
    driver = None
    try:
        # a resumed run rebuilds the mirrors from the saved plans: it is checked as a first run is
        mirrors = {name: Mirror(input_path, work, f".verify-{name}") for name in mirror_names}
        reader = WeightReader(model.graph, sites, options.device)
        for index in range(resumed):
            plan, exact_weights = checkpoint.load_plan(work, index)
            apply_plan(model, plan, recipe.output_format, context)
            notes += mirror.follow(mirrors, plan, sites, exact_weights)
            plans.append(plan.summary())
        residual = _on(state.residual, options.device) if resumed else prior.initial_statistics(reader, recipe)
        measured = _measured(input_path, reader, recipe, options, progress, total)
        if measured is not None:
            notes.append(measured.note())
        if progress:
            progress(f"resumed after {units[resumed - 1].label}" if resumed else "start", _sites(plans), total)
        with cluster:
            if options.ray:
                job = distributed.Job(str(input_path.resolve()), key, recipe, options.device, keep_float, options.threads)
                driver = distributed.Driver(cluster, job, reader, units, work)
                checkpoint.save(work, checkpoint.State(key, resumed, residual))  # plans may finish out of order
                planned_units = driver.plans(resumed, residual, progress, _sites(plans), total)
            else:
                planned_units = _local_plans(reader, recipe, keep_float, units, resumed, residual, work, measured)
            for index, planned in planned_units:
                apply_plan(model, planned.plan, recipe.output_format, context)
                notes += mirror.follow(mirrors, planned.plan, sites, planned.rounded_float)
                plans.append(planned.plan.summary())
                checkpoint.save(work, checkpoint.State(key, index + 1, planned.residual))
                del planned
                memory.release()  # hand the unit's freed buffers back to the OS before the next one
                if progress and driver is None:
                    progress(units[index].label, _sites(plans), total)
        notes += finish(model, recipe, {s.container_bits for p in plans for s in p.sites if "excluded" not in s.transforms})
        save.externalize_remaining(model, writer, keep_names=context.store.written)
        writer.close()
        save.save_model(model, work / output_path.name)
        checks = {name: m.finish() for name, m in mirrors.items()}
        optimise_seconds = time.perf_counter() - started
        verification = _verify(input_path, work / output_path.name, sites, verify_mode, recipe, checks)
        for path in checks.values():  # verification only: never published
            path.unlink()
            path.with_name(path.name + ".data").unlink()
        save.write_companions(companions, work)
        save.publish(work, output_path, location, extra=list(companions))
    except KeyboardInterrupt:
        _close(writer, mirrors)
        done = checkpoint.plans_kept(work, key)
        if not done:  # nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise Interrupted(_interrupted_message(work, output_path, done, len(units))) from None
    except (VerificationFailed, Resumable, DamagedPlan):
        _close(writer, mirrors)  # the work directory stays: for inspection, or to resume
        raise
    except BaseException:
        _close(writer, mirrors)
        shutil.rmtree(work, ignore_errors=True)
        raise

    plan_notes = [n for p in plans for n in p.notes]
    report = Report.build(
        input_path=input_path,
        output_path=output_path,
        recipe=recipe,
        sites=sites,
        results=[site for p in plans for site in p.sites],
        seconds=optimise_seconds,
        notes=notes + sites.notes + plan_notes + context.notes
        + [f"{name} fell back to identity statistics: {why}" for name, why in sites.unmatched.items()],
    )
    report.verification = {"verified": True, **verification} if verification else {"verified": False, "why": unverified_why}
    report.online = [_rotation_entry(r) for p in plans for r in p.online]
    report.resumed_units = resumed + (driver.reused if driver else 0)
    if driver is not None:
        report.distributed = driver.summary(options.ray.address)
    if allocation is not None:
        report.allocation = allocation.to_dict() | {"written_bits_per_weight": report.totals()["bits_per_weight"]}
        report.allocation["written_bytes"] = save.written_bytes(output_path)
    report.write_json(report_path_for(output_path))
    return report


def _sites(plans: list[UnitPlan]) -> int:
    return sum(len(p.sites) for p in plans)


def _on(x: stats.Moments | None, device: str) -> stats.Moments | None:
    return None if x is None else stats.Moments(x.mean.to(device), x.cov.to(device))


def _measured(input_path: Path, reader: WeightReader, recipe: Recipe, options: RunOptions, progress, total: int):
    """The generated statistics (self_statistics.py) where the recipe asks for them, else None."""
    if recipe.method.statistics != Statistics.GENERATED or not methods.method_for(recipe.method).weighs_by_statistics:
        return None
    if options.ray:
        raise DfqError("--statistics generated runs in one process: run without --ray, or with --statistics propagated")
    say = (lambda text: progress(text, 0, total)) if progress else None
    inputs_of = self_statistics.linear_inputs(reader.sites, reader.nodes)
    return self_statistics.measure(input_path, reader.sites, inputs_of, recipe.method, options.threads, say)


def _local_plans(reader: WeightReader, recipe: Recipe, keep_float: bool, units, start: int, residual, work: Path, measured=None):
    """(index, Planned) in unit order, one after the other in this process, each saved as it ends."""
    held = {} if measured is None else measured.inputs  # each unit's measured inputs leave memory with it
    for unit in units[:start]:  # planned before an interruption
        for lin in unit.linears:
            held.pop(lin.node, None)
    for index in range(start, len(units)):
        inputs = {lin.node: _on(held.pop(lin.node), reader.device) for lin in units[index].linears if lin.node in held}
        planned = planner.plan_unit(reader, recipe, units[index], residual, keep_float, inputs)
        residual = planned.residual
        checkpoint.save_plan(work, index, planned.plan, planned.rounded_float)
        yield index, planned
        del planned  # not held while the next unit is computed


def _rotation_entry(r) -> dict:
    return {"nodes": r.linears, "tensor": rotation_name(r.block), "k": r.k, "block": r.block.shape[-1], "layer": r.layer}


def _start(work: Path, key: str, resume: bool) -> tuple[checkpoint.State, list[str]]:
    """A fresh work directory, or the unfinished run's state when resuming it is asked for and possible."""
    notes = []
    if work.is_dir():
        state, why_not = checkpoint.load(work, key)
        if resume and state is not None:
            return state, [f"resumed an unfinished run after {state.units_done} layer(s); they were not recomputed"]
        if resume:
            notes.append(f"--resume: {why_not}; started afresh")
        elif state is not None:
            notes.append("an unfinished run of this job was discarded (pass --resume to continue one)")
        shutil.rmtree(work, ignore_errors=True)
    elif resume:
        notes.append("--resume: no unfinished run was found; started afresh")
    save.make_work_dir(work)
    return checkpoint.State(fingerprint=key), notes


def _mirror_names(recipe: Recipe, verify_mode: str) -> list[str]:
    """The float copies that verification compares against (only when logits are compared)."""
    if verify_mode != "compare" or recipe.float_output:
        return []  # a float output is itself compared with the input
    return ["exact", "dequantized"] if methods.method_for(recipe.method).transforms_weights else ["dequantized"]


def _close(writer: save.ExternalDataWriter, mirrors: dict[str, Mirror]) -> None:
    writer.close()
    for mirror in mirrors.values():
        mirror.close()


def _interrupted_message(work: Path, output: Path, done: int, total: int) -> str:
    if not done:
        return f"interrupted before the first layer finished; nothing was written to {output}"
    return (
        f"interrupted after {done} of {total} layers; nothing was written to {output}. "
        f"Run the same command with --resume to continue (progress is kept in {work})"
    )


VERIFY_AUTO_LIMIT: int | None = None  # bytes of input weights up to which "auto" compares logits; None: from memory
# ONNX Runtime holds a float model at a time while verifying (the input, then each float copy). Measured
# on the 2B shape cut to 2 layers (2.5 GiB of fp16 weights, --method rtn): the whole run peaked at 6.0 GB
# RSS with --verify compare, 1.8 GB with none, so 2.2 bytes per weight byte; a third more is asked of the
# memory available when the run starts.
VERIFY_MEMORY_PER_WEIGHT_BYTE = 3.0


def verify_auto_limit() -> int:
    if VERIFY_AUTO_LIMIT is not None:
        return VERIFY_AUTO_LIMIT
    return int(memory.available_bytes() / VERIFY_MEMORY_PER_WEIGHT_BYTE)


def _verify_mode(requested: str, model: ir.Model) -> tuple[str, str | None]:
    """The mode, and why the output is not run when "auto" decides so: a model whose float copies
    would not fit in the memory available is not loaded in ORT."""
    if requested != "auto":
        return requested, None if requested != "none" else "--verify none"
    size, limit = load.weight_bytes(model), verify_auto_limit()
    if size <= limit:
        return "compare", None
    why = (
        f"--verify auto: the input's weights ({size / 2**30:.1f} GiB) need about {size * VERIFY_MEMORY_PER_WEIGHT_BYTE / 2**30:.1f} "
        f"GiB to verify, more than the {limit * VERIFY_MEMORY_PER_WEIGHT_BYTE / 2**30:.1f} GiB available; pass --verify run "
        "(or compare) to check it anyway"
    )
    return "none", why


def _verify(input_path: Path, candidate: Path, sites: ModelSites, mode: str, recipe: Recipe, checks: dict[str, Path]) -> dict | None:
    """Run the written model in ONNX Runtime before it is published: a model ORT rejects, or one that
    does not compute what the method decided, is never left behind."""
    if mode == "none":
        return None
    from . import verify  # ONNX Runtime is needed only here

    fp16 = any(lin.weight.dtype == "FLOAT16" for lin in sites.linears.values())
    fidelity_path = verify.without_accuracy_level(candidate) if checks.get("dequantized") else None
    result = verify.check_output(
        input_path,
        candidate,
        sites,
        compare=mode == "compare",
        exact=checks.get("exact"),
        dequantized=checks.get("dequantized"),
        float_output=recipe.float_output and mode == "compare",
        dtype="float16" if fp16 else "float32",
        scratch=candidate.parent,
        fidelity_path=fidelity_path,
    )
    if mode == "compare":
        result["quality"] = quality_check(input_path, candidate)
    return result


# What `optimize` measures of the output's quality once it is verified: KL to the input on a few
# sequences the input samples itself (no text: the model's own samples). 4 x 32 tokens took 22 s of
# a 132 s run on Gemma 3 270M (its genai folder, 2 cores shared with two other jobs); the KL of so
# few tokens is a sign, not a measurement (0.37 where 8 x 64 tokens give 0.19): `dfq-onnx eval`.
QUALITY_SAMPLES, QUALITY_LENGTH = 4, 32


def quality_check(input_path: Path, candidate: Path) -> dict:
    """KL(input || output) per token, top-1 agreement and both perplexities on sequences the input
    samples itself (seed 0, temperature 0.8); {"skipped": why} where the model cannot be sampled."""
    from ..evaluation import evaluate

    t0 = time.perf_counter()
    try:
        got = evaluate(input_path, candidate, samples=QUALITY_SAMPLES, length=QUALITY_LENGTH, seed=0)
    except DfqError as exc:
        return {"skipped": str(exc)}
    out = got["candidates"][0]
    return {
        "kl": out["kl"], "top1": out["top1"], "ppl": out["ppl"], "input_ppl": got["reference"]["ppl"],
        "samples": QUALITY_SAMPLES, "length": QUALITY_LENGTH, "seed": 0, "temperature": got["settings"]["temperature"],
        "sequences": got["sequences"], "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def report_path_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".report.json")


def check_exclude(recipe: Recipe, sites: ModelSites) -> None:
    """Every name to keep in float must be a role or one of the model's linears (never a silent no-op)."""
    for name in recipe.exclude:
        if name == sites.lm_head or name == "lm_head":
            raise DfqError(f"exclude '{name}': the lm_head follows --lm-head (keep leaves it in float)")
        if name not in ROLES and name not in sites.linears:
            some = ", ".join(list(sites.linears)[:3])
            raise DfqError(
                f"exclude '{name}' is neither a role ({', '.join(ROLES)}) nor a linear of this model "
                f"(node names as `dfq-onnx inspect` lists them, e.g. {some})"
            )


def check_weight_types(model: ir.Model) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype == ir.DataType.BFLOAT16 and len(tensor.shape) == 2:
            raise DfqError(
                f"weight '{value.name}' is bf16, which ONNX Runtime's CPU MatMulNBits cannot run; "
                "export the model in fp16 or fp32"
            )
