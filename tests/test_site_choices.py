"""What a deployment chooses per site: `--exclude` keeps linears in float, recipe overrides give
roles and layers their own bits and blocks, accuracy_level reaches QDQ output, and the report
says which linears ONNX Runtime's fast CUDA kernel takes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from dfq_onnx.front.cli import main
from dfq_onnx.fast_path import N_MULTIPLE
from dfq_onnx.passes.apply import QDQ_ACCURACY_KEY


def run(model: Path, out: Path, *flags: str) -> dict:
    assert main(["optimize", str(model), "-o", str(out), "--quiet", *flags]) == 0
    return json.loads(out.with_name(out.stem + ".report.json").read_text())


def nodes_by_source(out: Path) -> dict[str, onnx.NodeProto]:
    """Written nodes keyed by the linear they came from (quantized nodes are named <linear>_Q<bits>)."""
    graph = onnx.load(str(out), load_external_data=False).graph
    return {n.name.rsplit("_Q", 1)[0] if n.op_type in ("MatMulNBits", "MatMul") else n.name: n for n in graph.node}


def attr(node: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"recipe{len(list(tmp_path.glob('recipe*.toml')))}.toml"
    path.write_text(text)
    return str(path)


def test_exclude_keeps_roles_and_nodes_in_float(tiny, tmp_path):
    model = tiny("genai-fp32")
    structure = json.loads(json.dumps(run(model, tmp_path / "probe.onnx", "--method", "rtn", "--verify", "none")["structure"]))
    down0 = next(lin["name"] for lin in structure["linears"] if lin["role"] == "down" and lin["layer"] == 0)
    out = tmp_path / "out.onnx"
    report = run(model, out, "--exclude", f"o,{down0}")  # the method, verified against the input
    assert report["verification"]["verified"] is True
    float_sites = {s["name"] for s in report["sites"] if "excluded" in s["transforms"]}
    expected = {lin["name"] for lin in structure["linears"] if lin["role"] == "o"} | {down0}
    assert float_sites == expected
    graph = onnx.load(str(out), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    for name in expected:
        assert ops.get(name) in ("MatMul", "Gemm"), f"{name} was not kept as a float MatMul"
    quantized = {n.name for n in graph.node if n.op_type == "MatMulNBits"}
    assert len(quantized) == len(report["sites"]) - len(expected)


def test_overrides_set_bits_per_role_and_layer(tiny, tmp_path):
    """k_quant_mixed's pattern: down of the first and last layers at 8 bits; v at block 64."""
    text = """
[quant]
bits = 4
block_size = 32
symmetric = true

[[override]]
roles = ["down"]
layers = [0, -1]
bits = 8

[[override]]
roles = ["v"]
block_size = 64
"""
    out = tmp_path / "out.onnx"
    report = run(tiny("genai-unfused"), out, "--recipe", recipe(tmp_path, text))
    assert report["verification"]["verified"] is True
    nodes = nodes_by_source(out)
    layers = max(s["layer"] for s in report["sites"] if s["layer"] is not None) + 1
    for site in report["sites"]:
        node = nodes[site["name"]]
        want_bits = 8 if site["role"] == "down" and site["layer"] in (0, layers - 1) else 4
        want_block = 64 if site["role"] == "v" else 32
        assert (attr(node, "bits"), attr(node, "block_size")) == (want_bits, want_block), site["name"]
        assert (site["bits"], site["block_size"]) == (want_bits, want_block)


def test_two_bit_override_raises_the_qdq_opset(tiny, tmp_path):
    text = '[quant]\nbits = 4\nblock_size = 32\nsymmetric = false\n[[override]]\nroles = ["gate", "up"]\nbits = 2\n'
    out = tmp_path / "out.onnx"
    report = run(tiny("dynamo"), out, "--recipe", recipe(tmp_path, text), "--format", "qdq", "--method", "rtn")
    model = onnx.load(str(out), load_external_data=False)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 25  # 2-bit DQ needs opset 25
    inits = {i.name: i.data_type for i in model.graph.initializer}
    weight_types = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    two_bit = sum(t in (onnx.TensorProto.UINT2, onnx.TensorProto.INT2) for t in weight_types)
    assert two_bit == sum(s["role"] in ("gate", "up") for s in report["sites"]) > 0


def test_bad_choices_fail_in_one_line(tiny, tmp_path, capsys):
    model = tiny("genai-fp32")
    cases = [
        (["--exclude", "nope"], "exclude 'nope' is neither a role"),
        (["--recipe", recipe(tmp_path, '[[override]]\nroles = ["dwn"]\nbits = 8\n')], "override roles ['dwn']"),
        (["--recipe", recipe(tmp_path, '[[override]]\nroles = ["down"]\nbits = 5\n')], "unsupported --bits 5"),
        (["--recipe", recipe(tmp_path, '[[override]]\nroles = ["down"]\n')], "an override sets nothing"),
    ]
    for flags, needle in cases:
        assert main(["optimize", str(model), "-o", str(tmp_path / "x.onnx"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_accuracy_level_reaches_the_output(tiny, tmp_path, fmt):
    out = tmp_path / "out.onnx"
    report = run(tiny("dynamo"), out, "--format", fmt, "--accuracy-level", "4", "--method", "rtn")
    model = onnx.load(str(out), load_external_data=False)
    if fmt == "matmulnbits":
        levels = {attr(n, "accuracy_level") for n in model.graph.node if n.op_type == "MatMulNBits"}
        assert levels == {4}
    else:
        assert {p.key: p.value for p in model.metadata_props}[QDQ_ACCURACY_KEY] == "4"
        assert any("session.qdq_matmulnbits_accuracy_level=4" in n for n in report["notes"])


def test_report_says_which_linears_hit_the_cuda_kernel(tiny, tmp_path):
    fp16 = run(tiny("genai-fp16"), tmp_path / "h.onnx", "--method", "rtn", "--verify", "none")
    for site in fp16["sites"]:  # fp16, symmetric 4-bit block 32: only N decides
        assert site["cuda_fast_path"] == (site["n"] % N_MULTIPLE == 0), site
    assert 0 < fp16["totals"]["cuda_fast_path_sites"] < len(fp16["sites"])  # the tiny MLP width (352) misses
    asym = run(tiny("genai-fp16"), tmp_path / "a.onnx", "--method", "rtn", "--asymmetric", "--verify", "none")
    assert all("zero points" in s["cuda_gemm_misses"] for s in asym["sites"]) and not asym["totals"]["cuda_fast_path_sites"]
    fp32 = run(tiny("genai-fp32"), tmp_path / "f.onnx", "--method", "rtn", "--verify", "none")
    assert all(any("fp32 activations" in w for w in s["cuda_gemm_misses"]) for s in fp32["sites"])
