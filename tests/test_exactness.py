"""Every free transform, applied without quantization (--bits 16), leaves the model's logits unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_models as T
from dfq_onnx.cli import main
from dfq_onnx.verify import feeds, logits_of, session

FORCE = "[method]\nname = 'cafeq'\nforce_transforms = true\nonline = ['down', 'gate_up']\nonline_block = 64\n"
# Online rotations: K = 352 (intermediate) takes blocks of 32, K = 128 (hidden) blocks of 64.
ALL_TRANSFORMS = {"norm-diag", "up-down-diag", "qk-rope-rotation", "vo-hadamard", "online-hadamard32", "online-hadamard64"}


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = session(path)
    return logits_of(sess, feeds(sess, ids, T.HEAD_DIM))


@pytest.mark.parametrize("style", T.STYLES)
def test_transforms_preserve_logits(tiny, tmp_path, style):
    recipe = tmp_path / "force.toml"
    recipe.write_text(FORCE)
    model, out = tiny(style), tmp_path / "t.onnx"
    assert main(["optimize", str(model), "-o", str(out), "--bits", "16", "--recipe", str(recipe), "--quiet"]) == 0
    report = json.loads((tmp_path / "t.report.json").read_text())
    used = {t for site in report["sites"] for t in site["transforms"]}
    assert ALL_TRANSFORMS <= used, used
    # One inserted rotation per activation and layer: the down input, and the input gate and up share.
    assert len(report["online"]) == 2 * T.LAYERS, report["online"]
    ids = np.random.default_rng(3).integers(0, T.VOCAB, size=(2, 20))
    ref, got = logits(model, ids), logits(out, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    if style == "genai-fp16":
        # fp16 storage rounds the transformed weights: stay within the export's own fp16 error.
        fp32 = logits(tiny("genai-fp32"), ids)
        assert rel <= 2 * np.abs(ref - fp32).max() / np.abs(fp32).max()
    else:
        assert rel < 1e-4, rel
    # The transforms changed the weights (the check is not vacuous).
    assert report["verification"]["max_abs_error"] < 1e-2


def test_method_lowers_proxy_against_rtn_on_every_role(tiny, tmp_path):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(tiny("dynamo")), "-o", str(out), "--bits", "3", "--quiet"]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    for role in report["roles"]:
        assert role["rel_error"] < role["rtn_rel_error"], role


def test_online_none_inserts_no_rotation(tiny, tmp_path):
    out = tmp_path / "q.onnx"
    flags = ["--bits", "4", "--online", "none", "--quiet", "--verify", "none"]
    assert main(["optimize", str(tiny("dynamo")), "-o", str(out), *flags]) == 0
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["online"]["rotations"] == 0
    assert not any(t.startswith("online") for site in report["sites"] for t in site["transforms"])
    import onnx

    assert not any(n.name.endswith("_online_rotate") for n in onnx.load(out, load_external_data=False).graph.node)
