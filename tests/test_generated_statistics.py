"""`--statistics generated`: each linear's input measured on sequences the model samples itself.

It reads nothing but the model's own files (checked by Python's audit hook, with HOME and the cache
variables pointed at empty folders and the model alone in a fresh folder), the same seed gives the same
bytes, and a model with nothing to generate (an encoder) gets a one-line error that names the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import file_digests

RUN_AND_LIST_OPENED = """
import json, sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and isinstance(args[0], (str, bytes)) else None)
from dfq_onnx.front.cli import main
code = main(sys.argv[2:])
json.dump({"code": code, "opened": sorted(set(opened))}, open(sys.argv[1], "w"))
"""


def _isolated_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "XDG_"))}
    for name in ("HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "HF_HOME", "TMPDIR"):
        folder = tmp / name.lower()
        folder.mkdir()
        env[name] = str(folder)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run_listing_opened(tmp: Path, args: list[str]) -> dict:
    listing = tmp / "opened.json"
    env = _isolated_env(tmp)
    proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST_OPENED, str(listing), *args], env=env, capture_output=True, text=True)
    assert listing.is_file(), proc.stdout + proc.stderr
    return json.loads(listing.read_text())


def _outside(path: str, allowed: list[Path]) -> bool:
    p = Path(path)
    if not p.is_absolute() or not p.exists() or p.is_dir():
        return False  # relative names are module lookups resolved under sys.path; folders hold no data
    resolved = p.resolve()
    return not any(resolved.is_relative_to(a) for a in allowed)


def test_generated_reads_no_file_but_the_models(tiny_family, tmp_path):
    source = tiny_family("llama", "genai-fp32").parent
    folder = tmp_path / "alone"
    shutil.copytree(source, folder)
    before = file_digests(folder / "model.onnx")
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = _run_listing_opened(tmp_path, ["optimize", str(folder / "model.onnx"), "-o", str(out), "--statistics", "generated", "--quiet"])
    assert result["code"] == 0
    code_and_system = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, *sys.path, "/proc", "/sys", "/dev", "/etc", "/usr") if p}
    repository = Path(__file__).resolve().parents[1]
    allowed = [folder.resolve(), out.parent.resolve(), *code_and_system, repository / "dfq_onnx", repository / "passes"]
    read = [p for p in result["opened"] if _outside(p, allowed)]
    assert read == [], f"files read besides the model's, the output's and the code's: {read}"
    assert file_digests(folder / "model.onnx") == before
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["recipe"]["method"]["statistics"] == "generated"
    assert any("the model sampled itself" in n and "no text read" in n for n in report["notes"])


def _optimize(model: Path, out: Path, *flags: str) -> dict[str, str]:
    from dfq_onnx.front.cli import main

    out.mkdir(parents=True)
    assert main(["optimize", str(model), "-o", str(out / "q.onnx"), "--verify", "none", "--quiet", *flags]) == 0
    return {k: v for k, v in file_digests(out / "q.onnx").items() if not k.endswith(".json")}


@pytest.mark.parametrize("style", ["dynamo", "genai-fp32"])
def test_same_seed_same_bytes_and_the_statistics_decide(tiny_family, tmp_path, style):
    """A cacheless export (dynamo: shorter samples) and a KV-cache one (onnxruntime-genai)."""
    model = tiny_family("qwen2", style)
    recipe = tmp_path / "short.toml"  # a cacheless graph reruns each prefix: fewer, shorter samples keep this test short
    recipe.write_text('[quant]\nbits = 4\nblock_size = 32\nsymmetric = true\n[method]\nsamples = 16\nsample_length = 48\n')
    flags = ("--recipe", str(recipe)) if style == "dynamo" else ()
    first = _optimize(model, tmp_path / "a", "--statistics", "generated", "--seed", "3", *flags)
    assert first == _optimize(model, tmp_path / "b", "--statistics", "generated", "--seed", "3", *flags)
    assert first != _optimize(model, tmp_path / "c", "--statistics", "generated", "--seed", "4", *flags)
    assert first != _optimize(model, tmp_path / "d", "--statistics", "propagated", *flags)


@pytest.mark.parametrize("style,length", [("dynamo", 64), ("genai-fp32", 256)])
def test_sample_length_is_cut_where_the_graph_needs_it(tiny_family, tmp_path, style, length):
    """The README's rule: 512 tokens asked; a cacheless graph (dynamo) samples 64, a KV-cache graph
    (onnxruntime-genai) up to its context length (the tiny models': 256)."""
    model = tiny_family("qwen2", style)
    recipe = tmp_path / "few.toml"
    recipe.write_text('[quant]\nbits = 4\nblock_size = 32\nsymmetric = true\n[method]\nsamples = 4\n')
    _optimize(model, tmp_path / "out", "--statistics", "generated", "--recipe", str(recipe))
    report = json.loads((tmp_path / "out" / "q.report.json").read_text())
    assert any(f"on 4 x {length} tokens the model sampled itself" in n for n in report["notes"]), report["notes"]


def _tiny_encoder(folder: Path) -> Path:
    """A BERT encoder (no lm_head: nothing to generate), exported with torch.onnx's defaults."""
    import torch
    import transformers

    config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}}
    torch.onnx.export(Hidden(), (torch.randint(0, 256, (1, 8)),), str(path), input_names=["input_ids"], dynamo=True, dynamic_shapes=dims)
    return path


def test_an_encoder_is_told_to_use_propagated(tmp_path, capsys):
    from dfq_onnx.front.cli import main

    model = _tiny_encoder(tmp_path / "bert")
    before = file_digests(model)
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    capsys.readouterr()  # the exporter's own messages
    assert main(["optimize", str(model), "-o", str(out), "--statistics", "generated", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--statistics propagated" in err[0] and "encoder" in err[0], err
    assert not any(out.parent.iterdir()) and file_digests(model) == before
    assert main(["optimize", str(model), "-o", str(out), "--quiet"]) == 0  # the data-free default takes it


def test_generated_beats_the_prior_where_the_models_text_differs_from_its_weights(tiny_root, tmp_path):
    """tiny_models.planted: a pre-norm model whose own text is loud in channels that the prior, uniform
    over the vocabulary, sees as quiet. Measured on other samples of the model (another seed) through
    ONNX Runtime, the generated statistics' int3 model is far closer to it (measured: KL 1.5e-5 against
    3.6e-3, 250x); without them the two would be alike."""
    import tiny_models

    from dfq_onnx import evaluation

    model = tiny_models.planted(tiny_root)
    outputs = []
    for statistics in ("propagated", "generated"):
        out = tmp_path / statistics / "q.onnx"
        _optimize(model, out.parent, "--bits", "3", "--asymmetric", "--statistics", statistics)
        outputs.append(str(out))
    result = evaluation.evaluate(str(model), outputs, samples=32, length=64, seed=11)
    prior, generated = (c["kl"] for c in result["candidates"])
    assert generated < 0.2 * prior, (generated, prior)
