"""Whole models: our round-to-nearest MatMulNBits equals ORT's MatMulNBitsQuantizer (DEFAULT) byte for byte."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from dfq_onnx.front.cli import main
from dfq_onnx.graph.load import load_model
from dfq_onnx.graph.sites import find_sites

quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")


def ort_default(model_path, out_path, block, symmetric, exclude):
    config = quantizer.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=4)
    q = quantizer.MatMulNBitsQuantizer(str(model_path), algo_config=config, nodes_to_exclude=exclude)
    q.process()
    return q.model.model


def nbits_nodes(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    inits = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(_base)) for t in model.graph.initializer}
    return {n.name: [inits[i] for i in n.input[1:] if i] for n in model.graph.node if n.op_type == "MatMulNBits"}


_base = None


@pytest.mark.parametrize("style", ["dynamo", "torchscript", "genai-fp32", "genai-fp16"])
@pytest.mark.parametrize("block,symmetric", [(32, True), (128, False)])
def test_matmulnbits_identical_to_ort_default(tiny, tmp_path, style, block, symmetric):
    global _base
    model = tiny(style)
    lm_head = find_sites(load_model(model)).lm_head
    theirs = ort_default(model, tmp_path / "ort.onnx", block, symmetric, exclude=[lm_head])
    out = tmp_path / "ours.onnx"
    args = ["optimize", str(model), "-o", str(out), "--bits", "4", "--block-size", str(block), "--quiet", "--verify", "none", "--method", "rtn"]
    args.append("--symmetric" if symmetric else "--asymmetric")
    assert main(args) == 0
    _base = tmp_path
    ours = nbits_nodes(onnx.load(out))
    _base = model.parent
    ref = nbits_nodes(theirs)
    assert ref and set(ours) == set(ref)
    for name, tensors in ref.items():
        assert len(ours[name]) == len(tensors), name
        for a, b in zip(ours[name], tensors):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert a.tobytes() == b.tobytes(), f"{name}: bytes differ"
