"""The paper's "Random" baseline (--recipe random-rotation): seeded random orthogonal blocks on the
MLP inputs and the V/O pairs, then round-to-nearest. The seed decides the bytes."""

from __future__ import annotations

import hashlib
import json

import torch

from dfq_onnx.cli import main
from dfq_onnx.quant import transforms


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes() + path.with_name(path.name + ".data").read_bytes()).hexdigest()


def test_random_orthogonal_is_orthogonal_and_seeded():
    a = transforms.random_orthogonal(64, torch.Generator().manual_seed(3))
    b = transforms.random_orthogonal(64, torch.Generator().manual_seed(3))
    c = transforms.random_orthogonal(64, torch.Generator().manual_seed(4))
    assert torch.allclose(a @ a.t(), torch.eye(64), atol=1e-5)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a.abs(), transforms.hadamard(64).abs())  # not a signed Hadamard


def test_seed_decides_the_bytes_and_the_function_is_kept(tiny, tmp_path):
    model = tiny("genai-fp32")
    outs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "7")):
        (tmp_path / name).mkdir()
        outs[name] = tmp_path / name / "q.onnx"  # one file name: the .onnx names its data file
        # --verify compare: the exactness check runs the transformed float copy against the input
        assert main(["optimize", str(model), "-o", str(outs[name]), "--recipe", "random-rotation", "--seed", seed, "--quiet"]) == 0
    assert digest(outs["a"]) == digest(outs["b"]) != digest(outs["c"])
    report = json.loads((tmp_path / "a" / "q.report.json").read_text())
    assert "exactness" in report["verification"]["checks"]
    tags = {t for s in report["sites"] for t in s["transforms"]}
    assert "vo-random" in tags and any(t.startswith("online-random") for t in tags)
    assert "gptq" not in tags and "norm-diag" not in tags  # round-to-nearest after the rotations, nothing else


def test_random_rotation_float_output_is_exact(tiny, tmp_path):
    out = tmp_path / "f.onnx"
    assert main(["optimize", str(tiny("genai-unfused")), "-o", str(out), "--recipe", "random-rotation", "--bits", "16", "--seed", "5", "--quiet"]) == 0
    report = json.loads((tmp_path / "f.report.json").read_text())
    assert report["verification"]["exactness_rel_error"] <= report["verification"]["exactness_limit"]
