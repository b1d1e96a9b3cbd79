"""Verification gates publication: a model that does not compute what the method decided is never written.

Each planted defect below is one a real change could introduce; the run must refuse with one line
that says which check failed and where, exit non-zero, and leave nothing at the output path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import file_digests
from dfq_onnx.cli import main
from dfq_onnx.graph import pack
from dfq_onnx.graph.load import load_model
from dfq_onnx.graph.sites import find_sites
from dfq_onnx.quant import site
from dfq_onnx.verify import model_logits

FORCE = "[method]\nname = 'cafeq'\nforce_transforms = true\n"


def outputs_at(out: Path) -> list[str]:
    """What a run left at the output path (the hidden work directory aside)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.stem) and not p.name.startswith("."))


def refuse(capsys, *args: str) -> str:
    capsys.readouterr()  # drop what building the fixture printed
    assert main(["optimize", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_default_genai_export_with_windowed_cache_is_quantized_and_checked(tiny_family, tmp_path):
    """The builder's default Gemma 2 export gives sliding layers a fixed-capacity KV cache."""
    model = tiny_family("gemma2", "genai-fp32")
    sites = find_sites(load_model(model))
    assert sites.kv_windows and set(sites.kv_windows.values()) == {16}  # the config's sliding_window
    before = file_digests(model)
    for method in ("rtn", "cafeq"):
        out = tmp_path / f"{method}.onnx"
        assert main(["optimize", str(model), "-o", str(out), "--method", method, "--quiet"]) == 0
        report = json.loads(out.with_name(f"{method}.report.json").read_text())
        checks = report["verification"]["checks"]
        assert checks == (["fidelity"] if method == "rtn" else ["exactness", "fidelity"])
        # A prompt longer than the window runs too, as onnxruntime-genai feeds it.
        ids = np.random.default_rng(0).integers(0, 500, size=(1, 24))
        assert np.isfinite(model_logits(out, ids, sites)).all()
    assert file_digests(model) == before


def test_a_bias_left_behind_by_a_transform_is_not_published(tiny_family, tmp_path, capsys, monkeypatch):
    """Qwen 2's q/k/v biases must move with the Q/K rotations and the V/O transform."""
    model = tiny_family("qwen2", "dynamo")
    recipe = tmp_path / "force.toml"
    recipe.write_text(FORCE)
    monkeypatch.setattr(site.SiteTransform, "columns", lambda self, b: b)  # the planted bug
    out = tmp_path / "q.onnx"
    line = refuse(capsys, str(model), "-o", str(out), "--recipe", str(recipe))
    assert line.startswith("dfq-onnx: error: exactness check failed") and "layer 0 attention" in line, line
    assert outputs_at(out) == []
    assert (tmp_path / ".q.onnx.partial").is_dir()  # kept for inspection, as the message says

    # --verify none publishes anyway, and the report says the model was not verified.
    assert main(["optimize", str(model), "-o", str(out), "--recipe", str(recipe), "--quiet", "--verify", "none"]) == 0
    assert json.loads((tmp_path / "q.report.json").read_text())["verification"]["verified"] is False


def test_bytes_that_do_not_decode_to_the_rounded_weights_are_not_published(tiny, tmp_path, capsys, monkeypatch):
    """A packing defect (high and low nibbles swapped) passes every other check: the model loads and runs."""
    real = pack.matmulnbits_b

    def swapped(codes, bits):
        b = real(codes, bits)
        return ((b >> 4) | (b << 4)).astype(np.uint8) if bits == 4 else b

    monkeypatch.setattr(pack, "matmulnbits_b", swapped)
    out = tmp_path / "q.onnx"
    line = refuse(capsys, str(tiny("dynamo")), "-o", str(out), "--method", "rtn")
    assert line.startswith("dfq-onnx: error: fidelity check failed") and "layer 0" in line, line
    assert outputs_at(out) == []


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_healthy_runs_pass_with_margin(tiny_family, tmp_path, family):
    """The limits sit far above what a correct run measures (so they do not fail by noise)."""
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(tiny_family(family, "dynamo")), "-o", str(out), "--quiet"]) == 0
    v = json.loads((tmp_path / "q.report.json").read_text())["verification"]
    assert v["exactness_rel_error"] < v["exactness_limit"] / 100, v
    assert v["fidelity_rel_error"] < v["fidelity_limit"] / 100, v
