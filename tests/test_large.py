"""Large-model machinery at a small size: the synthetic model generator, and interrupted runs resumed.

The generator makes the real dynamo export graph of Gemma 2 at a given shape with streamed
random weights; here at a few-layer toy shape so the test stays quick. An interrupted run
(SIGKILL: no handler runs) is resumed and must give the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import file_digests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import make_synthetic  # noqa: E402

LAYERS = 3


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "model.onnx"
    assert make_synthetic.main(["--shape", "gemma2-tiny", "--layers", str(LAYERS), "-o", str(out)]) == 0
    return out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dfq_onnx.front.cli", *args]


def test_synthetic_model_has_the_real_graph(synthetic):
    from dfq_onnx.run.pipeline import inspect

    shape = make_synthetic.SHAPES["gemma2-tiny"]
    sites = inspect(synthetic)
    assert len(sites.layers()) == LAYERS
    for att in sites.attentions:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (shape.heads, shape.kv_heads, shape.head_dim)
    roles = sorted(lin.role.value for lin in sites.linears.values() if lin.layer == 0)
    assert roles == ["down", "gate", "k", "o", "q", "up", "v"]
    assert all(lin.weight.dtype == "FLOAT16" for lin in sites.linears.values())
    # the weights were planted: not zeros, spread 1/sqrt(K), a few outlier input channels
    session = ort.InferenceSession(str(synthetic), providers=["CPUExecutionProvider"])
    ids = np.arange(1, 17, dtype=np.int64)[None]
    logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert logits.shape == (1, 16, shape.vocab) and np.isfinite(logits).all() and logits.std() > 0


def test_synthetic_weights_are_reproducible(synthetic, tmp_path):
    again = tmp_path / "model.onnx"
    assert make_synthetic.main(["--shape", "gemma2-tiny", "--layers", str(LAYERS), "-o", str(again)]) == 0
    # the weights are the same bytes (the graph file carries the exporter's own metadata)
    assert file_digests(again)["model.onnx.data"] == file_digests(synthetic)["model.onnx.data"]


def test_killed_run_resumes_to_identical_bytes(synthetic, tmp_path):
    args = ["optimize", str(synthetic), "--method", "cafeq", "--verify", "none", "--quiet"]
    whole = tmp_path / "whole" / "model.q4.onnx"
    whole.parent.mkdir()
    subprocess.run(_cli(*args, "-o", str(whole)), check=True, cwd=REPO)

    out = tmp_path / "resumed" / "model.q4.onnx"
    out.parent.mkdir()
    work = out.parent / f".{out.name}.partial"
    proc = subprocess.Popen(_cli(*args, "-o", str(out)), cwd=REPO)
    manifest = work / "checkpoint.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the hardest interruption
    proc.wait()
    done = json.loads(manifest.read_text())["units_done"]
    assert 1 <= done < LAYERS, "the run should have been killed between layers"
    assert not out.exists() and not (out.parent / f"{out.name}.data").exists(), "no partial output where the user looks"

    subprocess.run(_cli(*args, "-o", str(out), "--resume"), check=True, cwd=REPO)
    assert not work.exists()
    report = json.loads((out.parent / "model.q4.report.json").read_text())
    assert report["resumed_units"] == done
    for name in ("model.q4.onnx", "model.q4.onnx.data"):
        assert (out.parent / name).read_bytes() == (whole.parent / name).read_bytes(), name


def test_interrupt_keeps_progress_and_says_how_to_resume(synthetic, tmp_path):
    out = tmp_path / "model.q4.onnx"
    work = tmp_path / f".{out.name}.partial"
    proc = subprocess.Popen(
        _cli("optimize", str(synthetic), "--method", "cafeq", "--verify", "none", "--quiet", "-o", str(out)),
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (work / "checkpoint.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # `kill`: handled like Ctrl-C
    _, err = proc.communicate()
    assert proc.returncode == 130
    assert "--resume" in err and "nothing was written" in err
    assert not out.exists() and (work / "checkpoint.json").exists()
    # without --resume the stale progress is discarded, and said so
    done = subprocess.run(
        _cli("optimize", str(synthetic), "--method", "rtn", "--verify", "none", "-o", str(out)),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and out.exists() and not work.exists()


GENAI_LAYERS = 5  # layers 3 and 4 are copies (one of each attention kind) and layer 4 feeds the final norm


def _structure(model) -> tuple:
    nodes = sorted(
        repr((n.name, n.op_type, [v.name if v else None for v in n.inputs], [v.name for v in n.outputs], {k: repr(a.value) for k, a in n.attributes.items()}))
        for n in model.graph
    )
    inits = sorted((name, tuple(v.const_value.shape), v.const_value.dtype) for name, v in model.graph.initializers.items())
    return nodes, inits, [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


def _logits(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = make_synthetic.SHAPES["gemma2-tiny"]
    ids = np.array([[2, 7, 99, 500, 31, 8]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, shape.kv_heads, 0, shape.head_dim), dtype=np.float16)
    return session.run(["logits"], feeds)[0]


def test_genai_synthetic_is_the_builders_own_graph(tmp_path):
    """The genai-style synthetic (3 built layers grown to 5) is node for node the builder's 5-layer graph, and
    with the same weights it computes the same logits."""
    import onnx_ir as ir
    import synthetic_genai

    synthetic = tmp_path / "synthetic" / "model.onnx"
    args = ["--shape", "gemma2-tiny", "--layers", str(GENAI_LAYERS), "--style", "genai", "-o", str(synthetic)]
    assert make_synthetic.main(args) == 0
    config = make_synthetic.gemma2_config(make_synthetic.SHAPES["gemma2-tiny"], GENAI_LAYERS)
    direct = synthetic_genai.run_builder(config, "fp16", tmp_path / "direct", GENAI_LAYERS)
    ours, theirs = ir.load(synthetic), ir.load(direct)
    assert _structure(ours) == _structure(theirs)
    config_ours = json.loads((synthetic.parent / "genai_config.json").read_text())
    config_theirs = json.loads((direct.parent / "genai_config.json").read_text())
    assert config_ours == config_theirs

    for name, value in theirs.graph.initializers.items():  # the builder's graph, given the synthetic weights
        value.const_value = ir.Tensor(ours.graph.initializers[name].const_value.numpy(), name=name)
    filled = tmp_path / "filled" / "model.onnx"
    filled.parent.mkdir()
    ir.save(theirs, filled, external_data="model.onnx.data")
    expected, got = _logits(filled), _logits(synthetic)
    assert np.isfinite(got).all() and got.std() > 0
    np.testing.assert_array_equal(got, expected)

    from dfq_onnx.run.pipeline import inspect

    sites = inspect(synthetic)
    assert len(sites.layers()) == GENAI_LAYERS
    assert sorted(lin.role.value for lin in sites.linears.values() if lin.layer == GENAI_LAYERS - 1) == ["down", "gate", "o", "qkv", "up"]


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")], ids=["unset", "user-set"])
def test_importing_the_package_asks_torch_for_huge_pages_before_torch_starts(preset, expected):
    """Layer-sized temporaries fault in 2 MiB pages only if torch's allocator was told before its
    first allocation: importing dfq_onnx sets THP_MEM_ALLOC_ENABLE (keeping a user's own value)."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = "import os, sys, dfq_onnx; assert 'torch' not in sys.modules; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_a_layers_mlp_weights_are_read_after_its_attention_is_rounded(synthetic, tmp_path, monkeypatch):
    """A unit's weights are read on first use: while a layer's attention is rounded its MLP weights
    (three quarters of the layer's bytes) are not in memory, which sets the peak of a large model."""
    from dfq_onnx.run import prior
    from dfq_onnx.front.cli import main
    from dfq_onnx.quant import layer
    from dfq_onnx.run.weights import WeightReader

    events: list[tuple] = []
    read, mlp = WeightReader.weight, layer.optimise_mlp

    def logged_read(self, lin, as_stored=False):
        events.append(("read", lin.role.value, lin.layer))
        return read(self, lin, as_stored=as_stored)

    def logged_mlp(*args, **kwargs):
        events.append(("mlp",))
        return mlp(*args, **kwargs)

    start = prior.initial_statistics

    def logged_start(reader, recipe):
        out = start(reader, recipe)
        events.clear()  # the prior's token pass reads every layer once, one at a time, before any rounding
        return out

    monkeypatch.setattr(WeightReader, "weight", logged_read)
    monkeypatch.setattr(prior, "initial_statistics", logged_start)
    monkeypatch.setattr(layer, "optimise_mlp", logged_mlp)
    assert main(["optimize", str(synthetic), "-o", str(tmp_path / "out.onnx"), "--verify", "none", "--quiet"]) == 0
    starts = [i for i, e in enumerate(events) if e[0] == "mlp"]
    mlp_roles = {"gate", "up", "gate_up", "down"}
    for index in range(LAYERS):
        reads = [(i, e[1]) for i, e in enumerate(events) if e[0] == "read" and e[2] == index]
        attention = [i for i, role in reads if role not in mlp_roles]
        mlp_reads = [i for i, role in reads if role in mlp_roles]
        assert attention and mlp_reads, events
        # the MLP weights are read once the layer's MLP is being rounded, after its attention is done
        assert any(max(attention) < s < min(mlp_reads) for s in starts), events
