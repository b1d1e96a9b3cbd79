"""The evaluation tools on the real Gemma 3 270M and SmolLM2-135M and Jane Austen (slow: `pytest -m slow`).

The model fixtures run tools/build_gemma3_270m.py and tools/build_smollm2_135m.py, which reuse
finished outputs under models/ (seconds) or build them offline (about five minutes each).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
MODEL_DIR = REPO / "models" / "gemma3-270m"
sys.path.insert(0, str(TOOLS))

import eval_quality  # noqa: E402
import realmodel  # noqa: E402
from build_gemma3_270m import flatten_rope_config  # noqa: E402


def build_real(name: str) -> Path:
    """Run a real model's build tool (reusing finished outputs); its folder under models/."""
    spec = realmodel.spec(name)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(REPO / realmodel.script(name)), "--out", str(spec.out)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (spec.out / "dynamo" / "model.onnx").is_file()
    return spec.out


@pytest.fixture(scope="module")
def built() -> Path:
    return build_real("gemma3-270m")


@pytest.fixture(scope="module")
def built_smollm2() -> Path:
    return build_real("smollm2")


@pytest.fixture(scope="module")
def text() -> str:
    return eval_quality.load_text()


def test_metrics_match_float64():
    """The fast float32-exp metrics agree with a plain float64 log-softmax."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 5000)).astype(np.float32) * 6
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 0.3
    t = rng.integers(0, 5000, 40)

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    lp, lq = log_softmax(a), log_softmax(b)
    nll, kl, top1 = eval_quality.compare(a, b, t)
    assert nll == pytest.approx(-lq[np.arange(40), t].sum(), rel=1e-7)
    assert kl == pytest.approx((np.exp(lp) * (lp - lq)).sum(), rel=1e-5)
    assert top1 == int((a.argmax(-1) == b.argmax(-1)).sum())
    assert eval_quality.nll_sum(a, t) == pytest.approx(-lp[np.arange(40), t].sum(), rel=1e-7)
    assert eval_quality.compare(a, a, t)[1] == 0.0


def test_flatten_rope_config():
    nested = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    flat = flatten_rope_config(nested)
    assert flat["rope_parameters"]["rope_type"] == "default"
    assert flat["rope_parameters"]["rope_theta"] == flat["rope_theta"] == 1e6
    assert flat["rope_parameters"]["rope_local_base_freq"] == flat["rope_local_base_freq"] == 1e4
    assert "full_attention" in nested["rope_parameters"]  # input untouched


@pytest.mark.slow
def test_text_is_pride_and_prejudice(text):
    assert text.startswith("PRIDE AND PREJUDICE By Jane Austen Chapter 1 It is a truth universally")
    assert "  " not in text and "\n" not in text
    assert 600_000 < len(text) < 800_000


@pytest.mark.slow
def test_reference_perplexity_is_sane(built, text):
    ref = built / "dynamo" / "model.onnx"
    result = eval_quality.evaluate(str(ref), [], windows=2, text=text, progress=False)
    ppl = result["reference"]["ppl"]
    assert result["tokens_evaluated"] == 2 * 511
    assert math.isfinite(ppl) and 5 < ppl < 60, ppl


@pytest.mark.slow
def test_reference_against_itself(built, text):
    ref = str(built / "dynamo" / "model.onnx")
    result = eval_quality.evaluate(ref, [ref], windows=2, text=text, progress=False)
    cand = result["candidates"][0]
    assert abs(cand["kl"]) < 1e-9
    assert cand["top1"] == 1.0
    assert cand["ppl"] == pytest.approx(result["reference"]["ppl"], rel=1e-9)


@pytest.mark.slow
def test_genai_export_matches_dynamo(built, text):
    genai = built / "genai" / "model.onnx"
    if not (built / "genai" / "build_info.json").is_file():
        pytest.skip("the onnxruntime-genai export did not build")
    result = eval_quality.evaluate(str(built / "dynamo" / "model.onnx"), [str(genai)], windows=1,
                                   text=text, progress=False)
    cand = result["candidates"][0]
    assert cand["kl"] < 1e-5  # genai rounds the embedding scale to 25.3: tiny but nonzero
    assert cand["top1"] > 0.99


SEARCHED = "[method]\nforce_transforms = true\nonline = ['down', 'gate_up']\nlearned_vo_steps = 0\n"
LEARNED = "[method]\nforce_transforms = true\nonline = ['down', 'gate_up']\nlearned_vo_steps = 20\nlearned_diagonal_steps = 20\nlearned_online_steps = 20\n"


@pytest.mark.slow
@pytest.mark.parametrize("style", ["dynamo", "genai"])
@pytest.mark.parametrize(
    "recipe_text, expected",
    [
        (SEARCHED, {"norm-diag", "up-down-diag", "vo-hadamard", "online-hadamard32"}),
        (LEARNED, {"norm-diag-learned", "up-down-diag-learned", "vo-learned", "online-learned32"}),
    ],
    ids=["searched", "learned"],
)
def test_transforms_preserve_real_logits(built, tmp_path, style, recipe_text, expected):
    """Every transform that applies to Gemma 3 (forced, online rotations included) at --bits 16:
    the searched ones, and the learned ones (general V/O and online blocks)."""
    import json

    from dfq_onnx.front.cli import main

    model = built / style / "model.onnx"
    if not model.is_file():
        pytest.skip(f"the {style} export did not build")
    recipe = tmp_path / "force.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / "t.onnx"
    assert main(["optimize", str(model), "-o", str(out), "--bits", "16", "--recipe", str(recipe), "--verify", "none", "--quiet"]) == 0
    report = json.loads((tmp_path / "t.report.json").read_text())
    used = {t for site in report["sites"] for t in site["transforms"]}
    # Gemma 3 has q/k norms: no Q/K rotation; everything else applies.
    assert expected <= used, used
    assert "qk-rope-rotation" not in used
    ids = np.random.default_rng(0).integers(0, 262144, size=(1, 64))
    ref = eval_quality.OrtLM(model).logits(ids)
    got = eval_quality.OrtLM(out).logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("style", ["dynamo", "genai"])
def test_smollm2_answers_and_inspects(built_smollm2, capsys, style):
    """SmolLM2 (a Llama) in both export styles: greedy ORT answer, and every role and pair found."""
    import json

    from dfq_onnx.front.cli import main

    model = built_smollm2 / style / "model.onnx"
    if not (built_smollm2 / style / "build_info.json").is_file():
        pytest.skip(f"the {style} export did not build")
    assert realmodel.greedy_answer(model, built_smollm2 / "hf", "The capital of France is").strip().startswith("Paris")
    assert main(["inspect", str(model), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["layers"] == 30 and found["vocab"] == 49152 and found["embedding"]["tied"]
    for layer in range(30):
        roles = {lin["role"] for lin in found["linears"] if lin["layer"] == layer}
        attn = next(a for a in found["attention"] if a["layer"] == layer)
        # the genai builder packs q, k and v into one linear by default; its split names the three
        qkv = {"q", "k", "v"} <= roles or ("qkv" in roles and len(attn["qkv_split"]) == 3)
        assert qkv and {"o", "gate", "up", "down"} <= roles, (layer, roles)
        assert (attn["num_heads"], attn["num_kv_heads"], attn["head_dim"]) == (9, 3, 64)
        assert {p["kind"] for p in found["pairs"] if p["layer"] == layer} == {"vo", "up_down", "qk"}
