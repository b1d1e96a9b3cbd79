"""onnxruntime-genai folders in, folders out: onnxruntime-genai loads the quantized folder and, at
8 bits, generates the input's first greedy tokens; `--bits 16` (transforms applied, no rounding)
generates the input's tokens; the input folder is never modified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

import independent
import quickstart  # tools/ (on the path through tiny_models)
from conftest import file_digests
from dfq_onnx.front.cli import main

og = pytest.importorskip("onnxruntime_genai")

PROMPT = [1, 17, 42, 99, 7, 250, 3]  # token ids: the tiny models' word-level tokenizer has no text to speak of
NEW_TOKENS = 24


def genai_folder(tiny_family, tmp_path: Path, family: str = "llama") -> Path:
    """A private copy of the tiny genai folder (the session's copy is shared by other tests)."""
    src = tiny_family(family, "genai-fp32").parent
    dst = tmp_path / f"{family}-genai"
    shutil.copytree(src, dst)
    return dst


def greedy(folder: Path, tokens: int = NEW_TOKENS) -> list[int]:
    return quickstart.greedy(og.Model(str(folder)), PROMPT, tokens)  # what the README's first command runs


def test_quantized_folder_loads_and_generates(tiny_family, tmp_path):
    src = genai_folder(tiny_family, tmp_path)
    before = file_digests(src / "genai_config.json")
    assert main(["optimize", str(src), "--bits", "8", "--quiet"]) == 0
    out = src.with_name(src.name + "-q8")  # the default: beside the input folder
    assert file_digests(src / "genai_config.json") == before, "the input folder changed"
    # Everything but the decoder and its data is carried; the config names the new decoder.
    carried = {p.name for p in src.iterdir()} - {"model.onnx", "model.onnx.data"}
    assert carried <= {p.name for p in out.iterdir()}
    config_in = json.loads((src / "genai_config.json").read_text())
    config_out = json.loads((out / "genai_config.json").read_text())
    assert config_out["model"]["decoder"]["filename"] == "model.onnx" and config_out == config_in
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # onnxruntime-genai decodes the 8-bit folder greedily as it decodes the input: the same first
    # tokens. The random tiny model's next-token distribution is nearly flat: its top-1 margins over
    # the first 8 steps measured 0.11, 0.031, 0.021, 5.2e-3, 0.099, 0.029, 1.2e-3, 2.2e-4, while 8 bits
    # moves each logit by up to 5.4e-3, so two logits can swap where the margin is below ~1.1e-2.
    # All 8 tokens match today, but only the first 3 are beyond that noise: those must match.
    tokens, want = greedy(out, 8), greedy(src, 8)
    assert len(tokens) == len(want) == len(PROMPT) + 8 and tokens[: len(PROMPT) + 3] == want[: len(PROMPT) + 3], (tokens, want)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")


def test_bits16_folder_generates_the_input_tokens(tiny_family, tmp_path):
    """Every transform the method chose, and no rounding: greedy decoding must not change."""
    src = genai_folder(tiny_family, tmp_path, "llama")
    out = tmp_path / "float-out"
    recipe = tmp_path / "forced.toml"
    recipe.write_text('[method]\nforce_transforms = true\n')
    assert main(["optimize", str(src), "-o", str(out), "--bits", "16", "--recipe", str(recipe), "--quiet"]) == 0
    report = json.loads((out / "model.report.json").read_text())
    # Transforms were really applied, not a plain copy: linears read rotations found in the written graph.
    front = independent.rotations_in_front(out / "model.onnx", [lin["name"] for lin in report["structure"]["linears"]])
    assert any(front.values())
    assert greedy(out) == greedy(src)


def test_named_output_file_writes_the_model_alone(tiny_family, tmp_path):
    src = genai_folder(tiny_family, tmp_path)
    before = file_digests(src / "genai_config.json")
    assert main(["optimize", str(src / "model.onnx"), "-o", str(src / "model.q4.onnx"), "--method", "rtn", "--quiet"]) == 0
    after = file_digests(src / "genai_config.json")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing of the input changed
    assert set(after) - set(before) == {"model.q4.onnx", "model.q4.onnx.data", "model.q4.report.json"}


def test_output_folder_may_not_be_the_input(tiny_family, tmp_path, capsys):
    src = genai_folder(tiny_family, tmp_path)
    before = file_digests(src / "genai_config.json")
    assert main(["optimize", str(src), "-o", str(src)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert file_digests(src / "genai_config.json") == before


def test_failed_run_leaves_no_folder(tiny_family, tmp_path, capsys):
    src = genai_folder(tiny_family, tmp_path)
    out = tmp_path / "never"
    assert main(["optimize", str(src), "-o", str(out), "--exclude", "no_such_node"]) == 2
    assert "no_such_node" in capsys.readouterr().err
    assert not out.exists()
