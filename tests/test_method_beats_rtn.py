"""On weights with outlier input channels, the method's 4-bit model is closer to the input than
round-to-nearest's, measured where it counts: the logits ONNX Runtime computes.

The tiny Llama below is built from its transformers config with random weights, then given what
real LLM weights have: a few input channels (weight rows of W[K, N], columns of torch's [out, in])
many times larger than the rest. The same hidden channels are large in every linear that reads the
residual stream (q, k, v, gate, up), as in real models; o and down get their own. Round-to-nearest
spends each 32-row block's grid on its largest weight, so the rows beside an outlier lose most of
their precision; the method's transforms and error feedback should not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models as T
from dfq_onnx.front.cli import main
from dfq_onnx.run.verify import feeds, logits_of, session

# One layer keeps the test near 30 s on 2 busy cores (the method's scale search dominates); the
# widths are the other tiny models' (hidden 128, MLP 352, GQA 4:2, vocab 500).
FAMILY = dataclasses.replace(T.FAMILIES["llama"], layers=1)
OUTLIERS = 4  # channels per input width
FACTOR = 8.0  # outlier rows are this many times their random size
IDS_SHAPE = (2, 16)


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean per-token KL(ref || got) of two logit arrays [batch, seq, vocab], in float64."""
    lp, lq = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (ref.astype(np.float64), got.astype(np.float64)))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def outlier_model(root: Path) -> Path:
    """The tiny Llama with planted outlier input channels, exported by TorchScript (the fastest exporter)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(FAMILY.config()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # gains of exactly one hide folding bugs (as tiny_models.hf_model)
                param.normal_(1.0, 0.3)
        hidden = torch.randperm(FAMILY.hidden, generator=g)[:OUTLIERS]
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight[:, hidden] *= FACTOR
            for lin in (att.o_proj, mlp.down_proj):
                lin.weight[:, torch.randperm(lin.in_features, generator=g)[:OUTLIERS]] *= FACTOR
    model.save_pretrained(root / "hf")
    target = root / "torchscript" / "model.onnx"
    target.parent.mkdir()
    T._torch_export(FAMILY, root / "hf", target, dynamo=False)
    return target


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    sess = session(path)
    return logits_of(sess, feeds(sess, ids, FAMILY.head_dim))


def test_method_kl_below_rtn_on_outlier_channels(tmp_path):
    model = outlier_model(tmp_path / "model")
    outputs = {}
    for name, flags in {"method": [], "rtn": ["--method", "rtn"]}.items():
        out = tmp_path / name / "q.onnx"
        out.parent.mkdir()
        assert main(["optimize", str(model), "-o", str(out), "--bits", "4", "--verify", "none", "--quiet", *flags]) == 0
        outputs[name] = out
    ids = np.random.default_rng(11).integers(0, FAMILY.vocab, size=IDS_SHAPE)
    ref = logits(model, ids)
    kl = {name: mean_kl(ref, logits(out, ids)) for name, out in outputs.items()}
    # Both really quantized (KL > 0); measured on this model: method 2.9e-4, RTN 3.0e-3 (0.1x).
    # 0.8x leaves the method an 8x margin and still fails a method no better than RTN.
    assert 0 < kl["method"] < 0.8 * kl["rtn"], kl
