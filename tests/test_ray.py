"""A run spread over a Ray cluster: the bytes of a local run, through a lost node, a driver that
stops and resumes, and a unit that fails.

The clusters are real multi-node Ray clusters simulated on this machine (ray.cluster_utils.Cluster):
a head that runs no tasks and two worker nodes of 1 CPU each, so every unit is computed in another
process on another node than the driver's. Each task reserves the node's one CPU (`ray_cpus=1`) and
computes with the driver's torch thread count, which the bytes depend on (dfq_onnx/threads.py).
The test without Ray installed runs everywhere; the others need the `ray` extra.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import tiny_models

import dfq_onnx
from dfq_onnx.run import pipeline
from dfq_onnx.front.cli import main
from dfq_onnx.config import TokenPrior
from dfq_onnx.errors import DfqError, Interrupted
from test_verify_gate import negate_saved_scales

SETTINGS = {"lm_head": "int8"}  # the head is a unit of its own: 3 units on the tiny model
OBJECT_STORE = 80 << 20  # bytes per node: the tiny model's plans are kilobytes


def model_in(tiny, directory: Path) -> Path:
    directory.mkdir(parents=True)
    src = tiny("genai-fp32")
    for name in (src.name, src.name + ".data"):
        shutil.copy(src.parent / name, directory / name)
    return directory / src.name


def model_bytes(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output.parent.iterdir()) if p.name.startswith(output.name)}


@pytest.fixture(scope="module")
def local_bytes(tiny, tmp_path_factory):
    """The bytes of a plain local run with the same settings (file name model.q4.onnx in every run)."""
    root = tmp_path_factory.mktemp("local")
    model = model_in(tiny, root / "in")
    out = root / "out" / "model.q4.onnx"
    out.parent.mkdir()
    dfq_onnx.quantize(model, out, **SETTINGS)
    return model_bytes(out)


def start_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    return ray, cluster, workers


def stop_cluster(ray, cluster) -> None:
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def cluster():
    ray, c, workers = start_cluster()
    yield c, workers
    stop_cluster(ray, c)


def ray_run(model: Path, out: Path, address: str, progress=None):
    out.parent.mkdir(parents=True, exist_ok=True)
    return dfq_onnx.quantize(model, out, ray=address, ray_cpus=1, progress=progress, **SETTINGS)


def test_cluster_run_writes_the_bytes_of_a_local_run(tiny, tmp_path, cluster, local_bytes):
    c, workers = cluster
    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out" / "model.q4.onnx"
    report = ray_run(model, out, c.address)
    assert model_bytes(out) == local_bytes
    run = report.distributed
    assert sorted(u["unit"] for u in run["units"]) == ["layer 0", "layer 1", "lm_head/embedding"]
    # two 1-CPU nodes take the first two units at once; the head (0 CPUs) runs none
    assert set(run["nodes"]) == {w.node_id for w in workers}
    assert json.loads(out.with_name("model.q4.report.json").read_text())["distributed"]["units"] == run["units"]
    assert not (out.parent / ".model.q4.onnx.partial").exists()


def test_run_survives_a_lost_node_with_the_same_bytes(tiny, tmp_path, cluster, local_bytes):
    c, workers = cluster
    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out" / "model.q4.onnx"
    removed = []

    def remove_the_other_node(label, done, total):
        # the first unit is back from one node: the other one is computing its unit (or has just
        # been given the next); take it away with its worker, as a machine that dies would
        if " on " in label and not removed:
            finished_on = label.split(" on ")[1]
            victim = next(w for w in workers if not w.node_id.startswith(finished_on))
            c.remove_node(victim, allow_graceful=False)
            removed.append(victim.node_id)

    report = ray_run(model, out, c.address, progress=remove_the_other_node)
    assert removed
    assert model_bytes(out) == local_bytes
    units = report.distributed["units"]
    assert sorted(u["unit"] for u in units) == ["layer 0", "layer 1", "lm_head/embedding"]
    # The lost node had taken a unit at the start; its result never came back from it: Ray ran it
    # again on the survivor, which computed every unit the run used.
    survivor = next(w.node_id for w in workers if w.node_id != removed[0])
    assert {u["node"] for u in units} == {survivor}


def stopped_after_first_unit(model: Path, out: Path, address: str) -> list[Path]:
    """A cluster run stopped (as Ctrl-C would) once a first unit is back; the plans it kept."""

    def stop(label, done, total):
        if " on " in label:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume"):
        ray_run(model, out, address, progress=stop)
    assert not out.exists()
    kept = sorted((out.parent / f".{out.name}.partial").glob("plan-*.npz"))
    assert kept, "the finished unit's plan is the checkpoint"
    return kept


def test_driver_stopped_then_resumed_redoes_only_missing_units(tiny, tmp_path, cluster, local_bytes):
    c, _ = cluster
    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out" / "model.q4.onnx"
    kept = stopped_after_first_unit(model, out, c.address)

    out.parent.mkdir(exist_ok=True)
    report = dfq_onnx.quantize(model, out, ray=c.address, ray_cpus=1, resume=True, **SETTINGS)
    assert model_bytes(out) == local_bytes
    assert report.resumed_units == len(kept)
    assert len(report.distributed["units"]) == 3 - len(kept)  # only the missing units were computed
    assert report.verification["checks"] == ["exactness", "fidelity"]  # the mirrors follow the kept plans too


def test_a_resumed_cluster_run_refuses_plans_changed_on_disk(tiny, tmp_path, cluster):
    """The plans an interrupted run kept (in order or ahead of it) are checked against their digests
    before they are applied: one changed on disk stops the run, nothing is published."""
    c, _ = cluster
    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out" / "model.q4.onnx"
    for plan_file in stopped_after_first_unit(model, out, c.address):
        negate_saved_scales(plan_file)
    with pytest.raises(DfqError, match=r"plan-\d+\.npz does not match the digest"):
        dfq_onnx.quantize(model, out, ray=c.address, ray_cpus=1, resume=True, **SETTINGS)
    assert not out.exists() and not out.with_name("model.q4.report.json").exists()


def test_a_failing_unit_fails_the_run_with_its_error(tiny, tmp_path, cluster, monkeypatch):
    """A NaN in the lm_head of a model too large for the up-front check: only the head's task reads
    it; its error ends the run, names the unit and the weight, and nothing is left behind."""
    c, _ = cluster
    model, name = tiny_models.with_nan_in_head(model_in(tiny, tmp_path / "src"), tmp_path / "in")
    monkeypatch.setattr(pipeline, "VERIFY_AUTO_LIMIT", 0)  # the large-model path: weights checked as read

    out = tmp_path / "out" / "model.q4.onnx"
    out.parent.mkdir(parents=True)
    # A uniform token prior: the default's token pass would meet the NaN in the driver, before any task
    # (tests/test_token_prior.py checks that message); here the head's task must be the first reader.
    uniform = dfq_onnx.load_recipe("cafeq-int4-cuda").with_overrides(**SETTINGS)
    uniform = dataclasses.replace(uniform, method=dataclasses.replace(uniform.method, token_prior=TokenPrior.UNIFORM))
    with pytest.raises(DfqError, match=rf"lm_head/embedding: weight '{name}' contains NaN"):
        dfq_onnx.quantize(model, out, recipe=uniform, ray=c.address, ray_cpus=1)
    assert list(out.parent.iterdir()) == []  # no model, no report, no work directory


def test_tasks_that_fit_no_node_are_refused(tiny, tmp_path, cluster):
    c, _ = cluster
    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out" / "model.q4.onnx"
    out.parent.mkdir()
    with pytest.raises(DfqError, match="--ray-cpus 1"):
        dfq_onnx.quantize(model, out, ray=c.address, ray_cpus=2, **SETTINGS)
    assert list(out.parent.iterdir()) == []


def test_a_thread_count_torch_cannot_take_is_refused(tiny, tmp_path):
    """torch runs in this process: its thread count is fixed, and another one is refused up front."""
    import torch

    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out.onnx"
    with pytest.raises(DfqError, match="OMP_NUM_THREADS"):
        dfq_onnx.quantize(model, out, threads=torch.get_num_threads() + 1)
    assert not out.exists()


def test_without_ray_the_flag_says_how_to_install_it(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does without the extra
    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model), "-o", str(out), "--ray", "auto", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[ray]'" in err[0], err
    assert not out.exists() and not (tmp_path / ".out.onnx.partial").exists()


def test_cli_threads_fixes_the_count_before_torch_starts(tiny, tmp_path):
    """`--threads 1`: the command line starts torch with one thread before anything imports it
    (a count set after torch started would be refused, exit 2)."""
    import subprocess

    model = model_in(tiny, tmp_path / "in")
    out = tmp_path / "out.onnx"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    cmd = [sys.executable, "-m", "dfq_onnx.front.cli", "optimize", str(model), "-o", str(out), "--threads", "1", "--verify", "none", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
