"""tools/compare_peers.py's input for ORT's quantizers with the lm_head quantized: a tied head gets its
own weight, so ORT quantizes it instead of silently keeping it in float, and the model is unchanged."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import matmul_nbits_quantizer as q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import compare_peers  # noqa: E402


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return session.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}})[0]


def _head_quantized(path: Path, head: str, tmp: Path) -> bool:
    """Whether ORT's default 4-bit quantizer turns the head's MatMul into MatMulNBits (it names it after the node)."""
    quant = q.MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=32, is_symmetric=True,
                                   algo_config=q.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=4))
    quant.process()
    out = tmp / f"{path.parent.name}-int4.onnx"
    quant.model.save_model_to_file(str(out), True)
    graph = onnx.load(str(out), load_external_data=False).graph
    return any(n.op_type == "MatMulNBits" and n.name.startswith(head) for n in graph.node)


def test_tied_head_gets_its_own_weight(tiny, tmp_path):
    src = tiny("dynamo")
    head = compare_peers.lm_head_node(src)
    assert head, "the tiny Gemma 2 export has an lm_head"
    untied = compare_peers.untied_head_model(src, head, tmp_path)
    assert untied != src and untied.is_file()
    ids = np.arange(1, 13, dtype=np.int64).reshape(1, 12) % 200
    np.testing.assert_allclose(_logits(untied, ids), _logits(src, ids), rtol=0, atol=1e-5)
    # ORT skips the tied head (a Transpose feeds its MatMul) and quantizes the untied one.
    assert not _head_quantized(src, head, tmp_path)
    assert _head_quantized(untied, head, tmp_path)
