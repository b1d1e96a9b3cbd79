"""The Python API: what `dfq-onnx optimize` and `dfq-onnx inspect` do, callable from a script.

    import dfq_onnx
    report = dfq_onnx.quantize("model.onnx", "model.q4.onnx", recipe="cafeq-int4-cuda", bits=4)
    print(report.totals()["bits_per_weight"])

The CLI is a thin layer over these two functions, so a caller gets the same validation, atomic
output, resume, memory settings and Ctrl-C / SIGTERM behaviour.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from ..config import DEFAULT_RECIPE, Recipe, load_recipe
from ..errors import DfqError
from ..graph.sites import ModelSites
from ..progress import ProgressBar, ProgressFn
from ..report import Report
from . import genai_folder
from .options import RECIPE_OPTIONS

# Keyword overrides of a recipe, as the CLI's flags name them.
OVERRIDES = tuple(o.name for o in RECIPE_OPTIONS)


def quantize(
    model: str | Path,
    output: str | Path | None = None,
    *,
    recipe: str | Path | Recipe | None = None,
    device: str = "cpu",
    verify: str = "auto",
    resume: bool = False,
    progress: bool | ProgressFn | None = None,
    threads: int | None = None,
    ray: str | None = None,
    ray_cpus: int | None = None,
    ray_gpus: float | None = None,
    ray_in_flight: int | None = None,
    target_bits: float | None = None,
    target_size: int | str | None = None,
    target_formats: str | None = None,
    target_weighting: str = "relative",
    **overrides,
) -> Report:
    """Quantize `model` (an .onnx file, or an onnxruntime-genai model folder) and write `output`.

    `recipe` is a built-in name, a TOML path or a `Recipe` (default: the CUDA fast-path layout);
    keyword overrides replace its settings: bits (2, 3, 4, 8; 16 applies the transforms only),
    block_size, symmetric, output_format ("matmulnbits" or "qdq"), lm_head ("keep", "int8",
    "int4"), method ("cafeq" or "rtn"), online, accuracy_level, exclude (node names or roles kept
    in float), fast (True: every learner the recipe turns on, off). `output` defaults to
    `<model>.q<bits>.onnx`, or `<folder>-q<bits>/` for a genai folder (`qdq<bits>` for QDQ, `float`
    with bits 16). `progress` is a callable (label, done, total), or True for a bar on stderr.
    `verify` is "auto", "compare", "run" or "none" (see `dfq-onnx optimize --help`).
    `threads`: torch threads of the optimisation (default: torch's); the bytes depend on it. It is
    fixed when torch starts: a process that already runs torch must have been started with it
    (OMP_NUM_THREADS), or a DfqError says so.

    `ray` spreads the layers over a Ray cluster ("auto", "local" or an address; needs the `ray`
    extra; this process's own connection when it has called ray.init): every node must see the
    model at the same path and have dfq-onnx installed. Each task computes with the driver's
    thread count and asks Ray for `ray_cpus` CPUs (default: as many) and `ray_gpus` GPUs (default:
    1 with a CUDA device);
    `ray_in_flight` bounds the layers submitted ahead of the one written next. The bytes equal a
    local run's with the same `threads`.

    `target_bits` (stored bits per quantized weight, as the report counts them) or `target_size`
    (bytes of the written model, or a string such as "1.5GB") chooses a format per linear within
    that budget from the weights alone (`target_formats`: the candidates as "bits:block:sym|asym,...";
    default: 2/4/8 bits at blocks 32/64/128, only the CUDA layouts for a CUDA-layout recipe); the
    choice is in `report.allocation`. `plan_budget` shows it without writing a model.

    Returns the run's `Report` (also written as JSON beside the output). Raises `DfqError` for a
    bad request or input, `Interrupted` when stopped by Ctrl-C or SIGTERM (resume with resume=True).
    """
    from .. import threads as thread_count

    thread_count.use(threads)  # before torch starts, where it has not: the count is fixed then
    from .. import memory
    from ..run.distributed import Settings, import_ray
    from ..run.pipeline import RunOptions, default_output_path, optimize

    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise DfqError(f"unknown setting(s) {', '.join(unknown)}: use {', '.join(OVERRIDES)}")
    chosen = _recipe(recipe).with_overrides(**overrides)
    cluster = None
    if ray is not None:
        import_ray()  # before anything is read or written
        gpus = ray_gpus if ray_gpus is not None else (1.0 if device.startswith("cuda") else 0.0)
        cluster = Settings(address=ray, cpus=ray_cpus, gpus=gpus, in_flight=ray_in_flight)
    elif ray_cpus is not None or ray_gpus is not None or ray_in_flight is not None:
        raise DfqError("ray_cpus, ray_gpus and ray_in_flight apply to a Ray run: pass ray='auto', 'local' or a cluster address")
    allocation = check_budget(target_bits, target_size, target_formats, target_weighting)
    options = RunOptions(device=check_device(device), verify=verify, resume=resume, threads=threads, ray=cluster, budget=allocation)
    source, target, companions = _paths(Path(model), None if output is None else Path(output), chosen)
    if target is None:
        target = default_output_path(source, chosen)
    memory.configure()
    bar = ProgressBar() if progress is True else None
    created = companions and not target.parent.exists()
    with _sigterm_interrupts(), contextlib.closing(bar) if bar else contextlib.nullcontext():
        try:
            if created:
                target.parent.mkdir()
            return optimize(source, target, chosen, options, progress=bar or progress or None, companions=companions)
        except BaseException:
            if created and not any(target.parent.iterdir()):  # a folder this run made, with nothing in it
                target.parent.rmdir()
            raise


def evaluate(reference: str | Path, candidates, **options) -> dict:
    """Compare quantized models with their reference in ONNX Runtime: per candidate, KL(reference ||
    candidate) per token, top-1 agreement and perplexity, on sequences the reference samples (default),
    a text (text=FILE) or multiple-choice tasks (tasks=DIR); a plain dict. What `dfq-onnx eval` does;
    options as `dfq_onnx.evaluation.evaluate` names them."""
    from ..evaluation import evaluate as run

    return run(reference, candidates, **options)


def inspect(model: str | Path) -> ModelSites:
    """What the tool finds in a model: per layer, each linear's role and shape, pairs, norms, RoPE."""
    from ..run.pipeline import inspect as find

    path = Path(model)
    folder = genai_folder.find(path) if path.exists() else None
    return find(folder.model if folder else path)


def plan_budget(
    model: str | Path,
    *,
    target_bits: float | None = None,
    target_size: int | str | None = None,
    target_formats: str | None = None,
    target_weighting: str = "relative",
    recipe: str | Path | Recipe | None = None,
    device: str = "cpu",
    **overrides,
):
    """The format `quantize` would choose per linear for this budget (a `budget.Allocation`), without
    writing a model: what `dfq-onnx inspect --plan --target-bits B` prints."""
    from ..graph import load
    from ..graph.sites import find_sites
    from ..run import budget

    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise DfqError(f"unknown setting(s) {', '.join(unknown)}: use {', '.join(OVERRIDES)}")
    chosen = _recipe(recipe).with_overrides(**overrides)
    wanted = check_budget(target_bits, target_size, target_formats, target_weighting)
    if wanted is None:
        raise DfqError("give a budget: target_bits (e.g. 3.5) or target_size (e.g. '1.5GB')")
    path = Path(model)
    folder = genai_folder.find(path) if path.exists() else None
    source = folder.model if folder else path
    graph = load.load_model(source)
    return budget.choose_formats(graph, find_sites(graph), chosen, wanted, check_device(device), graph_bytes=source.stat().st_size)


def check_budget(bits: float | None, size: int | str | None, formats: str | None, weighting: str = "relative"):
    """The budget these settings give (None without one), or a DfqError naming the bad setting."""
    from ..run import budget

    if bits is None and size is None:
        if formats is not None:
            raise DfqError("--target-formats needs a budget: --target-bits B or --target-size SIZE")
        return None
    size = budget.parse_size(size) if isinstance(size, str) else size
    return budget.Budget(bits, size, budget.parse_formats(formats) if formats else (), weighting)


def _recipe(recipe: str | Path | Recipe | None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(str(recipe) if recipe is not None else DEFAULT_RECIPE)


def _paths(model: Path, output: Path | None, recipe: Recipe) -> tuple[Path, Path | None, dict]:
    """The model file to read, the model file to write, and what is published beside it."""
    folder = genai_folder.find(model)
    if folder is None:
        return model, output, {}
    from ..graph import load
    from ..run.pipeline import output_suffix

    destination = genai_folder.output_folder(folder, output, output_suffix(recipe))
    if destination is None:  # `-o file.onnx`: the model alone
        return folder.model, output, {}
    target = destination / folder.model_file

    data_files = load.external_data_files(load.load_model(folder.model))
    return folder.model, target, genai_folder.companions(folder, data_files, target.name)


def check_device(name: str) -> str:
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise DfqError(f"device '{name}': use cpu or cuda[:N]")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DfqError(f"device {name}: no CUDA device is visible to torch; use cpu")
    return name


@contextlib.contextmanager
def _sigterm_interrupts():
    """`kill` stops a run like Ctrl-C (progress is kept for resume); restored afterwards. Only the
    main thread may set handlers: elsewhere the caller's own handling stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
