"""The Olive pass `DfqOnnxQuantization` run by a real Olive workflow: the same bytes as the CLI, and
dfq-onnx's own error messages when a setting is bad. Skipped without olive-ai (`pip install .[olive]`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("olive")

import onnx  # noqa: E402
from olive.hardware import DEFAULT_CPU_ACCELERATOR  # noqa: E402
from olive.workflows import run as olive_run  # noqa: E402

from dfq_onnx.front.api import OVERRIDES  # noqa: E402
from dfq_onnx.front.cli import main  # noqa: E402
from dfq_onnx.front.olive_pass import DfqOnnxQuantization, package_config  # noqa: E402

# The same settings as pass parameters and as CLI flags.
CASES = {
    "rtn": ({"bits": 4, "block_size": 32, "method": "rtn"}, ["--bits", "4", "--block-size", "32", "--method", "rtn"]),
    "cafeq": ({"bits": 4, "block_size": 32, "method": "cafeq"}, ["--bits", "4", "--block-size", "32", "--method", "cafeq"]),
    # A size budget: the pass chooses the same format per linear as the CLI (every tiny K is a multiple of 32).
    "budget": (
        {"target_bits": 4.5, "target_formats": "2:32:asym,4:32:sym,8:32:sym"},
        ["--target-bits", "4.5", "--target-formats", "2:32:asym,4:32:sym,8:32:sym"],
    ),
}


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")


def run_workflow(model: Path, root: Path, **params):
    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "passes": {"dfq": {"type": "DfqOnnxQuantization", **params}},
        # Olive's cache and output stay in the test's folder.
        "cache_dir": str(root / "olive-cache"),
        "output_dir": str(root / "olive-out"),
        "log_severity_level": 3,
    }
    return olive_run(workflow, package_config=package_config())


@pytest.mark.parametrize("case", CASES)
def test_workflow_matches_cli(tiny, tmp_path, case):
    params, flags = CASES[case]
    model = tiny("genai-fp32")

    output = run_workflow(model, tmp_path, **params)
    assert output.has_output_model()
    best = output.get_best_candidate()
    assert best.from_pass().lower() == "dfqonnxquantization"
    # A folder output: the model file, its external data and the report side by side.
    assert Path(best.model_path) == tmp_path / "olive-out"
    olive_model = Path(best.model_path) / best.model_config["onnx_file_name"]
    assert olive_model.name == "model.onnx"
    # Olive recorded the run in its own cache, where the pass wrote the model first.
    assert list((tmp_path / "olive-cache").rglob("model.onnx.data"))

    cli_model = tmp_path / "cli" / "model.onnx"
    cli_model.parent.mkdir()
    assert main(["optimize", str(model), "-o", str(cli_model), "--quiet", *flags]) == 0

    for name in ("model.onnx", "model.onnx.data"):
        assert (olive_model.parent / name).read_bytes() == (cli_model.parent / name).read_bytes(), name
    ops = {n.op_type for n in onnx.load(olive_model, load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    report = json.loads((olive_model.parent / "model.report.json").read_text())
    assert report  # the run's report travels with the model
    if "target_bits" in params:  # a mix of formats within the budget, as the report says
        assert len({s["format"] for s in report["allocation"]["sites"]}) >= 2
        assert report["totals"]["bits_per_weight"] <= params["target_bits"] + 1e-9


def test_parameters_follow_the_api():
    params = DfqOnnxQuantization.default_config(DEFAULT_CPU_ACCELERATOR)
    assert set(params) == {"recipe", *OVERRIDES, "device", "verify", "target_bits", "target_size", "target_formats", "target_weighting"}


def test_package_config_keeps_builtin_passes(tmp_path):
    path = tmp_path / "packages.json"
    merged = package_config(path)
    assert json.loads(path.read_text()) == merged
    assert merged["passes"]["DfqOnnxQuantization"]["module_path"] == "dfq_onnx.front.olive_pass.DfqOnnxQuantization"
    assert "OnnxBlockWiseRtnQuantization" in merged["passes"]


def test_bad_setting_fails_before_running(tiny, tmp_path):
    # Rejected while Olive builds the pass config: no pass runs, nothing is written.
    with pytest.raises(ValueError, match=r"dfq-onnx: unsupported --bits 5"):
        run_workflow(tiny("genai-fp32"), tmp_path, bits=5)
    assert not list((tmp_path / "olive-cache").rglob("*.onnx"))


def test_bad_budget_fails_before_running(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"dfq-onnx: --target-formats item '4:32'"):
        run_workflow(tiny("genai-fp32"), tmp_path, target_bits=4.5, target_formats="4:32")
    assert not list((tmp_path / "olive-cache").rglob("*.onnx"))


def test_error_during_run_fails_workflow(tiny, tmp_path):
    # Only known once the model is read: dfq-onnx's message comes out of olive.workflows.run.
    with pytest.raises(ValueError, match=r"dfq-onnx: exclude 'no_such_node' is neither a role"):
        run_workflow(tiny("genai-fp32"), tmp_path, method="rtn", exclude=["no_such_node"])
    assert not (tmp_path / "olive-out" / "model.onnx").exists()
