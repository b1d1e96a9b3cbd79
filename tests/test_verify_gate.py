"""Verification gates publication: a model that does not compute what the method decided is never written.

Each planted defect below is one a real change could introduce; the run must refuse with one line
that says which check failed and where, exit non-zero, and leave nothing at the output path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dfq_onnx
from conftest import file_digests
from dfq_onnx import memory
from dfq_onnx.run import pipeline, verify
from dfq_onnx.front.cli import main
from dfq_onnx.errors import Interrupted
from dfq_onnx.graph import pack, rewrite
from dfq_onnx.graph.load import load_model
from dfq_onnx.graph.sites import find_sites
from dfq_onnx.quant import site
from dfq_onnx.run.verify import model_logits

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


def swap_nibbles(b: np.ndarray, bits: int) -> np.ndarray:
    """A packing defect: high and low nibbles swapped."""
    return ((b >> 4) | (b << 4)).astype(np.uint8) if bits == 4 else b


def test_bytes_that_do_not_decode_to_the_rounded_weights_are_not_published(tiny, tmp_path, capsys, monkeypatch):
    """A packing defect (high and low nibbles swapped) passes every other check: the model loads and runs."""
    real = pack.matmulnbits_b
    monkeypatch.setattr(pack, "matmulnbits_b", lambda codes, bits: swap_nibbles(real(codes, bits), bits))
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


# -- a resumed run is held to the same checks as a first run


def interrupted_after_first_unit(model: Path, out: Path, **settings) -> Path:
    """Run until the first unit's plan is saved, then stop as Ctrl-C would; returns the work directory."""

    def stop(label, done, total):
        if label != "start":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume"):
        dfq_onnx.quantize(model, out, progress=stop, **settings)
    work = out.parent / f".{out.name}.partial"
    assert (work / "plan-00000.npz").is_file()
    return work


def negate_saved_scales(plan_file: Path) -> None:
    """Edit a saved plan as a damaged disk or a stray script would: every scale negated (finite
    logits, another function), the rest of the file, its header included, as it was."""
    with np.load(plan_file, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(bytes(arrays["header"]).decode())
    for q in header["quantized"].values():
        arrays[q["scales"]] = -arrays[q["scales"]]
    with open(plan_file, "wb") as f:
        np.savez(f, **arrays)


def test_a_resumed_run_refuses_a_plan_changed_on_disk(tiny, tmp_path, capsys):
    model = tiny("dynamo")
    out = tmp_path / "q.onnx"
    work = interrupted_after_first_unit(model, out)
    negate_saved_scales(work / "plan-00000.npz")
    line = refuse(capsys, str(model), "-o", str(out), "--resume")
    assert "plan-00000.npz" in line and "digest" in line and "without --resume" in line, line
    assert outputs_at(out) == []
    assert (work / "plan-00000.npz").is_file()  # kept for inspection


def test_a_resumed_run_is_checked_for_fidelity(tiny, tmp_path, capsys, monkeypatch):
    """A packing defect in the run that resumes reaches the units it re-applies from their saved
    plans: the fidelity check, rebuilt from those plans, refuses it."""
    model = tiny("dynamo")
    out = tmp_path / "q.onnx"
    interrupted_after_first_unit(model, out)
    real = pack.matmulnbits_b
    monkeypatch.setattr(pack, "matmulnbits_b", lambda codes, bits: swap_nibbles(real(codes, bits), bits))
    line = refuse(capsys, str(model), "-o", str(out), "--resume")
    assert line.startswith("dfq-onnx: error: fidelity check failed") and "layer 0" in line, line
    assert outputs_at(out) == []


def test_a_resumed_run_runs_every_check_of_a_first_run(tiny, tmp_path):
    """Undisturbed, the resumed run publishes the bytes of an uninterrupted one, after both checks."""
    model = tiny("dynamo")
    first = tmp_path / "first" / "q.onnx"
    first.parent.mkdir()
    dfq_onnx.quantize(model, first)
    out = tmp_path / "resumed" / "q.onnx"
    out.parent.mkdir()
    interrupted_after_first_unit(model, out)
    report = dfq_onnx.quantize(model, out, resume=True)
    assert report.resumed_units >= 1
    assert report.verification["checks"] == ["exactness", "fidelity"]
    for name in ("q.onnx", "q.onnx.data"):
        assert (out.parent / name).read_bytes() == (first.parent / name).read_bytes(), name


# -- each check, planted


def test_non_finite_logits_are_not_published(tiny, tmp_path, capsys, monkeypatch):
    """One scale written as +inf: finite weights in, an inf column in the written model. `--verify run`
    runs no mirror, so the finite-logits check is the gate here."""
    real = rewrite.PackedWeight.matmulnbits_tensors

    def one_inf_scale(self):
        out = real(self)
        scales, dtype = out["scales"]
        scales = scales.copy()
        scales[0, 0] = np.inf
        return {**out, "scales": (scales, dtype)}

    monkeypatch.setattr(rewrite.PackedWeight, "matmulnbits_tensors", one_inf_scale)
    out = tmp_path / "q.onnx"
    line = refuse(capsys, str(tiny("dynamo")), "-o", str(out), "--method", "rtn", "--verify", "run")
    assert line.startswith("dfq-onnx: error: the written model produced non-finite logits"), line
    assert outputs_at(out) == []


def test_qdq_bytes_that_do_not_decode_to_the_rounded_weights_are_not_published(tiny, tmp_path, capsys, monkeypatch):
    """The QDQ layout has packing code of its own (signed sub-byte values, row-major): its defect too is caught."""
    real = rewrite._pack_flat
    monkeypatch.setattr(rewrite, "_pack_flat", lambda values, bits: swap_nibbles(real(values, bits), bits))
    out = tmp_path / "q.onnx"
    line = refuse(capsys, str(tiny("dynamo")), "-o", str(out), "--method", "rtn", "--format", "qdq")
    assert line.startswith("dfq-onnx: error: fidelity check failed") and "layer 0" in line, line
    assert outputs_at(out) == []


def test_fp16_limits_pass_a_healthy_run_and_refuse_a_defect(tiny, tmp_path, capsys, monkeypatch):
    """fp16 exports get the looser limits (verify.py): a correct run stays well under them, and a
    packing defect is still far above."""
    model = tiny("genai-fp16")
    out = tmp_path / "ok.onnx"
    assert main(["optimize", str(model), "-o", str(out), "--quiet"]) == 0
    v = json.loads((tmp_path / "ok.report.json").read_text())["verification"]
    assert (v["exactness_limit"], v["fidelity_limit"]) == (verify.EXACT_LIMIT["float16"], verify.FIDELITY_LIMIT["float16"])
    assert v["exactness_rel_error"] < v["exactness_limit"] / 5 and v["fidelity_rel_error"] < v["fidelity_limit"] / 5, v

    real = pack.matmulnbits_b
    monkeypatch.setattr(pack, "matmulnbits_b", lambda codes, bits: swap_nibbles(real(codes, bits), bits))
    bad = tmp_path / "bad.onnx"
    line = refuse(capsys, str(model), "-o", str(bad), "--method", "rtn")
    assert line.startswith("dfq-onnx: error: fidelity check failed"), line
    assert outputs_at(bad) == []


def test_a_model_past_the_auto_limit_says_why_it_was_not_verified(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "VERIFY_AUTO_LIMIT", 1 << 10)  # 1 KiB: any model is past it
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(tiny("dynamo")), "-o", str(out), "--method", "rtn"]) == 0
    why = json.loads((tmp_path / "q.report.json").read_text())["verification"]
    assert why["verified"] is False and why["why"].startswith("--verify auto: the input's weights"), why
    assert "GiB" in why["why"] and "--verify run" in why["why"], why
    printed = capsys.readouterr()
    assert "NOT verified (--verify auto: the input's weights" in printed.out + printed.err


def test_the_auto_limit_follows_the_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 28 << 30)
    assert pipeline.verify_auto_limit() == int((28 << 30) / pipeline.VERIFY_MEMORY_PER_WEIGHT_BYTE)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 << 30)
    assert pipeline.verify_auto_limit() < 1 << 30
