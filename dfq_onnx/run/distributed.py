"""Spreading a run's units over a Ray cluster, with the bytes of a local run.

The method's work on a unit depends only on its float weights and on the propagated statistics,
which follow from the float model alone (prior.unit_statistics). So the driver chains the
cheap statistics pass, sends each unit with the statistics at its input to a Ray task, and
applies the plans it gets back in layer order, as a local run does:

- each task reads only its unit's weights, by positioned reads from the input path (every node
  must see that path: a shared filesystem), and checks that the file is the one the driver read;
- each task computes with the driver's torch thread count (its worker is started with it:
  threads.py), so its bytes are the
  local run's;
- at most `in_flight` units are submitted ahead of the next one to apply: the driver holds that
  many statistics and plans, whatever the model's depth;
- a task lost with its worker or node is retried by Ray; a unit that raises fails the run;
- every finished plan is saved in the work directory on arrival: `--resume` redoes only the
  units that have none.

Ray is an optional dependency (`pip install -e '.[ray]'`), imported only here.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import memory, methods, threads
from ..config import Recipe
from ..errors import DfqError, Resumable
from ..plan import UnitPlan
from ..progress import ProgressFn
from ..quant import stats
from . import checkpoint, planner, prior
from .units import all_units
from .weights import WeightReader

RETRIES = 3  # tries after the first when a task's worker or node dies
MAX_IN_FLIGHT = 16  # default bound on units submitted ahead of the one applied next
INSTALL = "pip install -e '.[ray]' (or pip install 'ray>=2.40')"


@dataclasses.dataclass(frozen=True)
class Job:
    """What every task needs besides its unit: plain values, sent once per task."""

    input_path: str  # absolute: the same path on every node
    fingerprint: str  # the driver's view of the input, recipe, device and threads
    recipe: Recipe
    device: str
    keep_float: bool
    threads: int


@dataclasses.dataclass
class Finished:
    """A unit's plan as a task returns it, with where and how long it ran."""

    index: int
    plan: UnitPlan
    rounded_float: dict[str, np.ndarray]
    node: str
    address: str
    seconds: float
    peak_rss_mib: float = 0.0  # the worker process's peak so far


@dataclasses.dataclass
class Settings:
    address: str  # "auto", "local", or a cluster address
    cpus: int | None = None  # CPUs Ray reserves per task; None: the driver's thread count
    gpus: float = 0.0  # GPUs per task
    in_flight: int | None = None  # units submitted ahead; None: twice the tasks the cluster runs at once, at most 16


def import_ray():
    try:
        import ray
    except ImportError:
        raise DfqError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


class Cluster:
    """The connection for one run: joins the cluster `address` names (or starts a private one for
    "local"), checks that a task fits on some node, and disconnects afterwards if it connected."""

    def __init__(self, settings: Settings, threads: int):
        self.ray = import_ray()
        self.settings, self.cpus = settings, settings.cpus or threads
        self._connected_here = False

    def __enter__(self) -> Cluster:
        ray = self.ray
        if not ray.is_initialized():
            address = None if self.settings.address == "local" else self.settings.address
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="warning")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise DfqError(
                    f"no Ray cluster at '{self.settings.address}' ({first}); start one with `ray start --head` "
                    "on every node, or pass --ray local for a cluster of this machine's cores"
                ) from None
            self._connected_here = True
        self._check_fits()
        return self

    def __exit__(self, *exc) -> None:
        if self._connected_here:
            self.ray.shutdown()

    def _check_fits(self) -> None:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        if most_cpus < self.cpus:
            raise DfqError(
                f"each task asks Ray for {self.cpus} CPUs (by default as many as the driver's threads), but no node of "
                f"the cluster has more than {most_cpus:g}; pass --ray-cpus {max(int(most_cpus), 1)}, or a smaller "
                "--threads (a local run with the same --threads gives the same bytes)"
            )
        if most_gpus < self.settings.gpus:
            raise DfqError(f"each task asks for {self.settings.gpus:g} GPU(s), but no node of the cluster has more than {most_gpus:g}")

    def in_flight(self) -> int:
        if self.settings.in_flight is not None:
            return max(1, self.settings.in_flight)
        res = self.ray.cluster_resources()
        slots = res.get("CPU", 0) // self.cpus
        if self.settings.gpus:
            slots = min(slots, res.get("GPU", 0) // self.settings.gpus)
        return int(max(2, min(2 * slots, MAX_IN_FLIGHT)))


class Driver:
    """Yields (index, Planned) in unit order from `start`, computed by Ray tasks; records where
    each unit ran (`placements`) and how many were taken from the work directory (`reused`)."""

    def __init__(self, cluster: Cluster, job: Job, reader: WeightReader, units: list[methods.Unit], work: Path):
        self.cluster, self.job, self.reader, self.units, self.work = cluster, job, reader, units, work
        self.placements: list[dict] = []
        self.reused = 0
        self.statistics_seconds = 0.0  # the driver's statistics pass
        self.apply_seconds = 0.0  # the driver writing plans into the output (the caller's time between units)

    def plans(self, start: int, residual: stats.Moments | None, progress: ProgressFn | None, done_sites: int, total: int) -> Iterator[tuple[int, planner.Planned]]:
        ray, job = self.cluster.ray, self.job
        task = ray.remote(run_unit).options(
            num_cpus=self.cluster.cpus,
            num_gpus=self.cluster.settings.gpus,
            max_retries=RETRIES,
            retry_exceptions=False,
            runtime_env={"env_vars": threads.environment(job.threads)},  # workers started with the driver's count
        )
        window = self.cluster.in_flight()
        pending: dict = {}  # ObjectRef -> unit index
        ready: dict[int, Finished] = {}
        after: dict[int, stats.Moments | None] = {}  # index -> statistics after the unit (the checkpoint's)
        next_stats = next_apply = start
        try:
            while next_apply < len(self.units):
                while next_stats < len(self.units) and next_stats < next_apply + window:
                    i, unit = next_stats, self.units[next_stats]
                    if checkpoint.has_plan(self.work, i):  # finished by an earlier, interrupted run
                        ready[i] = Finished(i, *checkpoint.load_plan(self.work, i), "", "", 0.0)
                        self.reused += 1
                        done_sites += len(ready[i].plan.sites)
                    else:
                        pending[task.remote(job, i, unit.label, _portable(residual))] = i
                    t0 = time.perf_counter()
                    residual = after[i] = prior.unit_statistics(self.reader, job.recipe, unit, residual)  # while the tasks run
                    self.statistics_seconds += time.perf_counter() - t0
                    next_stats += 1
                if next_apply in ready:
                    finished = ready.pop(next_apply)
                    t0 = time.perf_counter()
                    yield next_apply, planner.Planned(finished.plan, after.pop(next_apply), finished.rounded_float)
                    self.apply_seconds += time.perf_counter() - t0
                    next_apply += 1
                    continue
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ref)
                finished = self._result(ray, ref, i)
                checkpoint.save_plan(self.work, i, finished.plan, finished.rounded_float)
                ready[i] = finished
                self.placements.append(
                    {
                        "unit": self.units[i].label,
                        "node": finished.node,
                        "address": finished.address,
                        "seconds": round(finished.seconds, 3),
                        "worker_peak_rss_mib": round(finished.peak_rss_mib, 1),
                    }
                )
                done_sites += len(finished.plan.sites)
                if progress:
                    progress(f"{self.units[i].label} on {finished.node[:8]}", done_sites, total)
        finally:
            for ref in pending:  # an error or an interrupt: nothing more is computed for this run
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 (a task that ended meanwhile; the run's own error comes first)
                    pass

    def _result(self, ray, ref, index: int) -> Finished:
        label = self.units[index].label
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, DfqError):
                raise DfqError(f"{label}: {cause}") from None
            raise exc.as_instanceof_cause() from None
        except ray.exceptions.RayError as exc:  # the worker, its node or the result was lost past the retries
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise Resumable(
                f"{label} was lost with its Ray worker {RETRIES + 1} times ({type(exc).__name__}: {first}); "
                f"the finished units are kept in {self.work}: run the same command with --resume"
            ) from None

    def summary(self, address: str) -> dict:
        nodes: dict[str, int] = {}
        for p in self.placements:
            nodes[p["node"]] = nodes.get(p["node"], 0) + 1
        return {
            "ray": address,
            "threads_per_task": self.job.threads,
            "cpus_per_task": self.cluster.cpus,
            "nodes": nodes,
            "units": self.placements,
            "reused_units": self.reused,
            "driver_statistics_seconds": round(self.statistics_seconds, 3),
            "driver_apply_seconds": round(self.apply_seconds, 3),
            "driver_peak_rss_mib": round(peak_rss_mib(), 1),
        }


def peak_rss_mib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _portable(x: stats.Moments | None) -> tuple[np.ndarray, np.ndarray] | None:
    return None if x is None else (x.mean.cpu().numpy(), x.cov.cpu().numpy())


# -- the task, run on a worker


_STATE: dict = {}  # the worker's loaded graph and weight reader, kept between its tasks for one input


def run_unit(job: Job, index: int, label: str, residual: tuple[np.ndarray, np.ndarray] | None) -> Finished:
    """Plan unit `index` from the input file, as the local run would (same threads, same statistics)."""
    import ray

    started = time.perf_counter()
    if torch.get_num_threads() != job.threads:
        raise DfqError(
            f"this worker computes with {torch.get_num_threads()} torch threads, the driver with {job.threads}: the bytes "
            "would differ; start the workers without OMP_NUM_THREADS set"
        )
    reader, units = _reader(job)
    unit = units[index]
    if unit.label != label:
        raise DfqError(f"this node finds '{unit.label}' where the driver found '{label}': the input differs between nodes")
    moments = None if residual is None else stats.Moments(*(torch.from_numpy(np.array(a)).to(job.device) for a in residual))
    planned = planner.plan_unit(reader, job.recipe, unit, moments, job.keep_float)
    rounded = {name: np.asarray(w) for name, w in planned.rounded_float.items()}
    node = ray.get_runtime_context().get_node_id()
    memory.release()
    seconds = time.perf_counter() - started
    return Finished(index, planned.plan, rounded, node, ray.util.get_node_ip_address(), seconds, peak_rss_mib())


def _reader(job: Job) -> tuple[WeightReader, list[methods.Unit]]:
    from ..graph import load
    from ..graph.sites import find_sites

    path = Path(job.input_path)
    if not path.is_file():
        raise DfqError(f"{path} is not visible on this node: every node must see the input at the same path (a shared filesystem)")
    key = (job.input_path, job.recipe, job.device, job.keep_float)
    if _STATE.get("key") != key:
        _STATE.clear()
        memory.configure()
        model = load.load_model(path)
        sites = find_sites(model)
        units = all_units(sites, model.graph, job.recipe)
        _STATE.update(key=key, model=model, reader=WeightReader(model.graph, sites, job.device), units=units)
    seen = checkpoint.fingerprint(path, load.external_data_files(_STATE["model"]), job.recipe, job.device, job.threads, job.keep_float)
    if seen != job.fingerprint:
        raise DfqError(
            f"{path} on node {os.uname().nodename} is not the file the driver read (changed since, or another copy): "
            "every node must see the same input (a shared filesystem)"
        )
    return _STATE["reader"], _STATE["units"]
