"""The structural matcher finds every role, shape, pair, norm and the RoPE layout in each export style."""

from __future__ import annotations

import pytest

import tiny_models as T
from dfq_onnx.graph.load import load_model
from dfq_onnx.graph.sites import Role, find_sites

H, KV, D = T.HEADS, T.KV_HEADS, T.HEAD_DIM
EXPECTED = {
    "q": (T.HIDDEN, H * D),
    "k": (T.HIDDEN, KV * D),
    "v": (T.HIDDEN, KV * D),
    "qkv": (T.HIDDEN, (H + 2 * KV) * D),
    "o": (H * D, T.HIDDEN),
    "gate": (T.HIDDEN, T.INTERMEDIATE),
    "up": (T.HIDDEN, T.INTERMEDIATE),
    "down": (T.INTERMEDIATE, T.HIDDEN),
    "lm_head": (T.HIDDEN, T.VOCAB),
}
FUSED = {"genai-fp32", "genai-fp16"}


@pytest.mark.parametrize("style", T.STYLES)
def test_every_role_found_with_its_shape(tiny, style):
    sites = find_sites(load_model(tiny(style)))
    attention_roles = ["qkv", "o"] if style in FUSED else ["q", "k", "v", "o"]
    for role in [*attention_roles, "gate", "up", "down"]:
        found = sites.by_role(Role(role))
        assert len(found) == T.LAYERS, f"{role}: {len(found)} found"
        assert sorted(lin.layer for lin in found) == list(range(T.LAYERS))
        for lin in found:
            assert (lin.k, lin.n) == EXPECTED[role], f"{role} shape {(lin.k, lin.n)}"
    assert not sites.by_role(Role.OTHER), [lin.node for lin in sites.by_role(Role.OTHER)]
    (lm,) = sites.by_role(Role.LM_HEAD)
    assert (lm.k, lm.n) == EXPECTED["lm_head"]
    assert sites.vocab == T.VOCAB


@pytest.mark.parametrize("style", T.STYLES)
def test_attention_geometry_rope_and_norms(tiny, style):
    sites = find_sites(load_model(tiny(style)))
    assert len(sites.attentions) == T.LAYERS
    for att in sites.attentions:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (H, KV, D)
        assert att.group_size == 2
        assert att.rope == "half"
        assert not att.qk_norm
        if att.qkv:
            assert att.qkv_split == (H * D, KV * D, KV * D)
        assert att.input_norm is not None and att.input_norm.exclusive
    for mlp in sites.mlps:
        assert mlp.input_norm is not None and mlp.input_norm.exclusive
        assert mlp.activation  # a GeGLU gate goes through an activation


@pytest.mark.parametrize("style", T.STYLES)
def test_embedding_and_tie(tiny, style):
    sites = find_sites(load_model(tiny(style)))
    emb = sites.embedding
    assert emb is not None and (emb.vocab, emb.hidden) == (T.VOCAB, T.HIDDEN)
    # TorchScript writes an untied copy of lm_head; the other exports share one initializer.
    assert emb.tied == (style != "torchscript")
    if style.startswith("genai"):
        assert emb.transposed  # genai's Gather reads Transpose(lm_head weight)
    if style == "dynamo":
        assert sites.linears[sites.lm_head].weight.transposed  # MatMul(x, Transpose(embedding))


@pytest.mark.parametrize("style", T.STYLES)
def test_pairs_recorded(tiny, style):
    sites = find_sites(load_model(tiny(style)))
    pairs = sites.pairs()
    kinds = sorted(p.kind for p in pairs)
    assert kinds == sorted(["vo", "qk", "up_down"] * T.LAYERS)
    vo = next(p for p in pairs if p.kind == "vo")
    heads = vo.detail["heads"]
    assert len(heads) == KV
    # KV head j serves query heads 2j and 2j+1: o rows [2j*D, (2j+2)*D).
    assert heads[1]["o_rows"] == [[2 * D, 3 * D], [3 * D, 4 * D]]
    offset = (H + KV) * D if style in FUSED else 0
    assert heads[0]["v_columns"] == [offset, offset + D]
    assert all(p.detail["applies"] for p in pairs if p.kind == "qk")
