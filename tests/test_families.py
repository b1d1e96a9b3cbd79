"""Every decoder family in every export style (tiny_models.cells()): the matcher finds every role,
free transforms keep the logits, round-to-nearest computes exactly what ONNX Runtime's own quantizer
does, the method's KL is below round-to-nearest's, and the input's files are never written.

The default run covers every Gemma 2 style and each other family in one style (the checks that run
the method: one cell of each family but Llama tied); `-m "slow or not slow"` runs every cell. A cell
declared unsupported (tiny_models.UNSUPPORTED) is skipped with its reason where it fails as
declared; every other failure fails, and so does a declared cell that works.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import independent
import tiny_models as T
from conftest import file_digests
from dfq_onnx.front.cli import main
from dfq_onnx.errors import DfqError
from dfq_onnx.graph.load import load_model
from dfq_onnx.graph.sites import Role, find_sites
from dfq_onnx.run.verify import feeds, logits_of, session
from test_exactness import FORCE

quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")

# The default run: every Gemma 2 style, and each other family in the style that sets it apart, at
# the lowest build cost (TorchScript exports in ~1 s, the builder and dynamo in ~10 s).
DEFAULT_CELLS = {("gemma2", s) for s in T.FAMILY_STYLES} | {
    ("llama", "torchscript"),
    ("llama-tied", "genai-fp16"),
    ("mistral", "torchscript"),
    ("qwen2", "genai-unfused"),  # q/k/v biases on their own linears
    ("qwen3", "torchscript"),
    ("phi3", "torchscript"),  # packed q|k|v and gate|up without a fused attention op
    ("phi4mini", "genai-fp32"),  # partial rotary inside GroupQueryAttention
    ("gemma3", "genai-fp32"),  # windowed KV cache, q/k norms, one KV head
}
# The checks that run the method (5-25 s per cell on 2 shared cores) run by default on one cell of
# each family but Llama tied (its cell, fp16, would need the fp32 export beside it): all five checks
# of the README's support table.
DEFAULT_METHOD_CELLS = {
    ("gemma2", "genai-fp32"),  # the builder's defaults
    ("llama", "torchscript"),
    ("mistral", "torchscript"),
    ("qwen2", "genai-unfused"),
    ("qwen3", "torchscript"),
    ("phi3", "torchscript"),
    ("phi4mini", "genai-fp32"),
    ("gemma3", "genai-fp32"),
}


def cells(default: set[tuple[str, str]]) -> list:
    return [pytest.param(f, s, id=f"{f}_{s}", marks=() if (f, s) in default else pytest.mark.slow) for f, s in T.cells()]


CELLS, METHOD_CELLS = cells(DEFAULT_CELLS), cells(DEFAULT_METHOD_CELLS)
# TorchScript writes Phi-3's q[..., :cos.shape[-1]] with a bound computed at run time: the matcher
# cannot know the rotary width, so it declines the Q/K rotations (rope "unknown") rather than guess.
RUNTIME_ROTARY = {("phi3", "torchscript"), ("phi4mini", "torchscript")}
FUSED_QKV_STYLES = {"genai-fp32", "genai-fp16", "genai-fullkv"}
# Prompts longer than the sliding window (16) so local and global layers differ.
IDS_SHAPE = (2, 24)


def packed(fam: T.Family, style: str) -> tuple[bool, bool]:
    """(q|k|v packed in one linear, gate|up packed in one linear) in this export of the family."""
    builder = style.startswith("genai")
    # The builder repacks q|k|v unless told not to, and always splits Phi 3's gate_up_proj.
    return (style in FUSED_QKV_STYLES) if builder else fam.fused, fam.fused and not builder


@pytest.fixture
def cell(tiny_family, family, style) -> tuple[T.Family, Path]:
    return T.FAMILIES[family], tiny_family(family, style)


class Runs:
    """Outputs shared by the checks of one cell, made once per module; the input's file digests are
    taken before anything reads it for quantization."""

    def __init__(self, factory):
        self.factory = factory
        self.done: dict[tuple, Path | str] = {}
        self.before: dict[Path, dict[str, str]] = {}
        self.cached_logits: dict[tuple, np.ndarray] = {}
        self.windows: dict[Path, dict[str, int]] = {}

    def optimize(self, model: Path, *flags: str) -> tuple[Path, dict]:
        key = (model, flags)
        if key not in self.done:
            self.before.setdefault(model, file_digests(model))
            out = self.factory.mktemp("out") / "q.onnx"
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(["optimize", str(model), "-o", str(out), "--quiet", *flags])
            self.done[key] = out if rc == 0 else f"dfq-onnx optimize {' '.join(flags)} exited {rc}: {err.getvalue().strip()}"
        result = self.done[key]
        assert isinstance(result, Path), result
        return result, json.loads(result.with_name("q.report.json").read_text())

    def ort_default(self, model: Path, bits: int, exclude: list[str]) -> Path:
        """ONNX Runtime's MatMulNBitsQuantizer, DEFAULT algorithm, at dfq-onnx's default layout."""
        key = (model, "ort", bits)
        if key not in self.done:
            self.before.setdefault(model, file_digests(model))
            config = quantizer.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits)
            q = quantizer.MatMulNBitsQuantizer(str(model), algo_config=config, nodes_to_exclude=exclude)
            q.process()
            out = self.factory.mktemp("ort") / "ort.onnx"
            q.model.save_model_to_file(str(out), use_external_data_format=True)
            self.done[key] = out
        return self.done[key]

    def logits(self, path: Path, fam: T.Family, like: Path | None = None, seed: int = 3) -> np.ndarray:
        """Logits on fixed random ids; `like` is the input model whose inputs `path` shares (its
        sliding-window caches, found by the matcher, are fed at their capacity)."""
        key = (path, seed)
        if key not in self.cached_logits:
            source = like or path
            if source not in self.windows:
                self.windows[source] = find_sites(load_model(source)).kv_windows
            ids = np.random.default_rng(seed).integers(0, fam.vocab, size=IDS_SHAPE)
            sess = session(path)
            self.cached_logits[key] = logits_of(sess, feeds(sess, ids, fam.head_dim, self.windows[source]))
        return self.cached_logits[key]

    def input_logits(self, model: Path, fam: T.Family, key: tuple[str, str], seed: int = 3) -> np.ndarray:
        """The input's logits. A cell declared not to run on ONNX Runtime's CPU provider
        (tiny_models.UNSUPPORTED, stage "cpu") is skipped with its reason once ONNX Runtime fails as
        declared, and fails if it runs; any other error fails the check."""
        declared = T.UNSUPPORTED.get(key)
        try:
            logits = self.logits(model, fam, seed=seed)
        except DfqError as exc:
            if declared is not None and declared.stage == "cpu" and declared.shown_by(str(exc)):
                pytest.skip(f"{key[0]} / {key[1]}: {declared.reason} ({exc})")
            raise
        if declared is not None:
            pytest.fail(f"{key[0]} / {key[1]} is declared not to run on CPU ({declared.reason}) but ran: "
                        "take it out of tiny_models.UNSUPPORTED and the README's support table")
        return logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory)


# By default every declared export failure (each costs ~1 s) and one of the two fp16 CUDA exports (~20 s each).
@pytest.mark.parametrize("family,style", [
    pytest.param(f, s, id=f"{f}_{s}", marks=pytest.mark.slow if (f, s) == ("qwen3", "genai-fp16") else ()) for f, s in T.UNSUPPORTED
])
def test_declared_limitation_still_shows(tiny_root, runs, family, style):
    """Each declared limitation (tiny_models.UNSUPPORTED, the README's ✗ cells) still shows, with the
    error declared: a cell that starts to work fails here until both tables say so."""
    declared, fam = T.UNSUPPORTED[(family, style)], T.FAMILIES[family]
    if declared.stage == "export":
        with pytest.raises(T.ExportFailed) as failed:
            T.build(family, style, tiny_root)
    else:
        model = T.build(family, style, tiny_root)
        with pytest.raises(DfqError) as failed:
            runs.logits(model, fam)
    assert declared.shown_by(str(failed.value)), str(failed.value)


def linears_of(sites, role: str):
    # Compared by value: a packed gate|up needs a role ("gate_up") the way packed q|k|v has "qkv".
    return [lin for lin in sites.linears.values() if lin.role.value == role]


@pytest.mark.parametrize("family,style", CELLS)
def test_every_role_shape_and_pair_found(cell, family, style):
    fam, model = cell
    sites = find_sites(load_model(model))
    qkv_packed, gate_up_packed = packed(fam, style)
    roles = [*(["qkv"] if qkv_packed else ["q", "k", "v"]), "o", *(["gate_up"] if gate_up_packed else ["gate", "up"]), "down"]
    for role in roles:
        found = linears_of(sites, role)
        assert sorted(lin.layer for lin in found) == list(range(fam.layers)), f"{role}: layers {[lin.layer for lin in found]}"
        for lin in found:
            assert (lin.k, lin.n) == fam.widths[role], f"{role} {lin.node}: shape {(lin.k, lin.n)}"
    missed = [(lin.node, lin.k, lin.n) for lin in sites.by_role(Role.OTHER)]
    assert not missed, f"linears without a role: {missed}"
    lm = sites.by_role(Role.LM_HEAD)
    assert [(x.k, x.n) for x in lm] == [fam.widths["lm_head"]]
    assert sites.vocab == fam.vocab
    emb = sites.embedding
    assert emb is not None and (emb.vocab, emb.hidden) == (fam.vocab, fam.hidden)
    assert emb.tied == (fam.tied and style != "torchscript")  # TorchScript writes an untied copy

    # The builder's default gives sliding layers a cache of fixed capacity (the window) that must be fed full.
    config = fam.config()
    windowed = style.startswith("genai") and "fullkv" not in style and fam.sliding
    sliding_layers = [i for i, t in enumerate(config.layer_types or []) if t == "sliding_attention"] if windowed else []
    expected_windows = {f"past_key_values.{i}.{kv}": config.sliding_window for i in sliding_layers for kv in ("key", "value")}
    assert sites.kv_windows == expected_windows

    assert len(sites.attentions) == fam.layers
    q, kv = fam.heads * fam.head_dim, fam.kv_heads * fam.head_dim
    for att in sites.attentions:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (fam.heads, fam.kv_heads, fam.head_dim), att.layer
        rope = "unknown" if (family, style) in RUNTIME_ROTARY else "half"
        assert att.rope == rope and att.qk_norm == fam.qk_norm, (att.layer, att.rope, att.qk_norm)
        if qkv_packed:
            assert att.qkv_split == (q, kv, kv), att.qkv_split
        assert att.input_norm is not None and att.input_norm.exclusive, att.input_norm
    assert len(sites.mlps) == fam.layers
    for mlp in sites.mlps:
        assert mlp.activation and mlp.input_norm is not None and mlp.input_norm.exclusive, mlp

    pairs = sites.pairs()
    assert sorted((p.kind, p.layer) for p in pairs) == sorted((k, i) for k in ("qk", "up_down", "vo") for i in range(fam.layers))
    g, d = fam.heads // fam.kv_heads, fam.head_dim
    v_offset = q + kv if qkv_packed else 0
    for p in pairs:
        if p.kind == "vo":
            heads = p.detail["heads"]
            assert [h["v_columns"] for h in heads] == [[v_offset + j * d, v_offset + (j + 1) * d] for j in range(fam.kv_heads)]
            assert [h["o_rows"] for h in heads] == [[[h * d, (h + 1) * d] for h in range(j * g, (j + 1) * g)] for j in range(fam.kv_heads)]
        elif p.kind == "up_down":
            up = fam.widths["gate_up" if gate_up_packed else "up"]
            assert (sites.linears[p.first].n, sites.linears[p.second].k) == (up[1], fam.intermediate)
        elif fam.qk_norm or (family, style) in RUNTIME_ROTARY:
            assert not p.detail["applies"], p.detail
        elif fam.rotary_dim < fam.head_dim:
            # Partial RoPE: a rotation over the whole head would not commute; decline or know the width.
            att = sites.attentions[p.layer]
            assert not p.detail["applies"] or att.rotary_dim == fam.rotary_dim, (p.detail, att.rotary_dim)
        else:
            assert p.detail["applies"], p.detail


def check_online_rotations(fam: T.Family, model: Path, out: Path, report: dict, fp16: bool) -> None:
    """FORCE's online rotations, counted in the written graph against the input's own linears: per
    layer one in front of the MLP input (K = hidden: Hadamard blocks of 64) that gate and up (or
    gate_up) share, one in front of down (K = intermediate, an odd multiple of 32: blocks of 32), no
    other; the report lists exactly those."""
    sites = find_sites(load_model(model))
    expected = []  # (layer, readers, K, block)
    for layer in range(fam.layers):
        of_layer = [lin for lin in sites.linears.values() if lin.layer == layer]
        mlp_in = sorted(lin.node for lin in of_layer if lin.role.value in ("gate", "up", "gate_up"))
        down = [lin.node for lin in of_layer if lin.role.value == "down"]
        expected += [(layer, mlp_in, fam.hidden, 64), (layer, down, fam.intermediate, 32)]
    graph = onnx.load(out, load_external_data=False).graph
    # Every MatMul that reads an inserted block (named online_rotation<b>..., one tensor per distinct block).
    inserted = {n.name for n in graph.node if n.op_type == "MatMul" and n.input[1].startswith("online_rotation")}
    assert len(inserted) == 2 * fam.layers, sorted(inserted)
    front = independent.rotations_in_front(out, [lin.node for lin in sites.linears.values()])
    found, rotating_nodes = [], set()
    for layer, readers, k, b in expected:
        got = {front[name][0] if front[name] else None for name in readers}
        assert len(got) == 1 and None not in got, f"layer {layer} {readers}: {got}"  # one, shared
        rotating, tensor, block = front[readers[0]]
        assert rotating in inserted and block.shape == (b, b), (layer, readers, rotating, block.shape)
        # A Hadamard block: entries +-1/sqrt(b), orthogonal (fp16 storage rounds each entry by <= 2^-11).
        assert np.abs(np.abs(block) * np.sqrt(b) - 1).max() <= (2.0**-11 if fp16 else 1e-6), (layer, readers)
        assert np.abs(block @ block.T - np.eye(b)).max() <= (1.01 * 2.0**-10 if fp16 else 1e-5), (layer, readers)
        found.append((layer, readers, tensor, k, b))
        rotating_nodes.add(rotating)
    assert rotating_nodes == inserted, sorted(inserted - rotating_nodes)  # each its own, none left over
    others = [name for name, hit in front.items() if hit and not any(name in readers for _, readers, _, _ in expected)]
    assert not others, f"rotated inputs of other linears: {others}"
    online = report["online"]
    assert online["rotations"] == len(online["inserted"]), online
    listed = [(r["layer"], sorted(r["nodes"]), r["tensor"], r["k"], r["block"]) for r in online["inserted"]]
    assert sorted(listed) == sorted(found), (listed, found)


def relative_max_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f == "gemma2" else pytest.mark.slow) for f, fam in T.FAMILIES.items() if fam.sliding])
def test_windowed_cache_fed_like_a_full_cache(runs, tiny_family, family):
    """The builder's default (windowed) and full-cache exports compute the same prompt logits when fed
    as their runtime feeds them: the feeding the other checks rely on is right."""
    fam = T.FAMILIES[family]
    windowed, full = tiny_family(family, "genai-fp32"), tiny_family(family, "genai-fullkv")
    # Same weights and ops, another cache layout: float32 summation-order noise only.
    assert relative_max_error(runs.logits(windowed, fam), runs.logits(full, fam)) < 1e-5


@pytest.mark.parametrize("family,style", METHOD_CELLS)
def test_forced_transforms_keep_the_logits(cell, runs, tmp_path, tiny_family, family, style):
    fam, model = cell
    ref = runs.input_logits(model, fam, (family, style))
    recipe = tmp_path / "force.toml"
    recipe.write_text(FORCE)
    out, report = runs.optimize(model, "--bits", "16", "--recipe", str(recipe))
    used = {t for site in report["sites"] for t in site["transforms"]}
    # FORCE asks for online blocks of 64: the hidden width (128) takes them, the MLP width (odd x 32) 32.
    expected = {"norm-diag", "up-down-diag", "vo-hadamard", "online-hadamard32", "online-hadamard64"}
    if not fam.qk_norm and fam.rotary_dim == fam.head_dim and (family, style) not in RUNTIME_ROTARY:
        expected.add("qk-rope-rotation")
    assert expected <= used, f"missing {expected - used}"
    check_online_rotations(fam, model, out, report, fp16=style == "genai-fp16")
    rel = relative_max_error(runs.logits(out, fam, model), ref)
    if style == "genai-fp16":
        # fp16 storage rounds the transformed weights: stay within the export's own fp16 error.
        fp32 = runs.logits(tiny_family(family, "genai-fp32"), fam)
        assert rel <= 2 * relative_max_error(ref, fp32), rel
    else:
        assert rel < 1e-4, rel


def nbits_tensors(path: Path) -> dict[str, list[tuple]]:
    """Per MatMulNBits node: dtype, shape and bytes of its B, scales and zero points."""
    model = onnx.load(path)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return {
        n.name: [(arrays[i].dtype, arrays[i].shape, arrays[i].tobytes()) for i in n.input[1:] if i]
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family,style", CELLS)
def test_rtn_computes_what_ort_default_computes(cell, runs, bits, family, style):
    fam, model = cell
    lm_head = find_sites(load_model(model)).lm_head
    ours, _ = runs.optimize(model, "--method", "rtn", "--bits", str(bits), "--verify", "none")
    theirs = runs.ort_default(model, bits, exclude=[lm_head])
    mine, ort = nbits_tensors(ours), nbits_tensors(theirs)
    assert ort and set(mine) == set(ort), f"quantized nodes differ: {sorted(set(mine) ^ set(ort))}"
    differ = [name for name in ort if mine[name] != ort[name]]
    assert not differ, f"bytes differ from ORT's in {differ}"
    runs.input_logits(model, fam, (family, style))
    got, want = runs.logits(ours, fam, model), runs.logits(theirs, fam, model)
    # Same bytes through the same kernels: equal to the last bit.
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max():.3e} of max |logit| {np.abs(want).max():.3e}"


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean per-token KL(ref || got) of two logit arrays [batch, seq, vocab], in float64."""
    lp, lq = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (ref.astype(np.float64), got.astype(np.float64)))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("family,style", METHOD_CELLS)
def test_method_kl_below_rtn_at_4_bits(cell, runs, family, style):
    fam, model = cell
    ref = runs.input_logits(model, fam, (family, style), seed=11)
    method, _ = runs.optimize(model, "--bits", "4", "--verify", "none")
    rtn, _ = runs.optimize(model, "--method", "rtn", "--bits", "4", "--verify", "none")  # as the RTN checks run it
    kl_method = mean_kl(ref, runs.logits(method, fam, model, seed=11))
    kl_rtn = mean_kl(ref, runs.logits(rtn, fam, model, seed=11))
    assert 0 < kl_method < kl_rtn, (kl_method, kl_rtn)


@pytest.mark.parametrize("family,style", CELLS)
def test_input_files_unchanged(cell, runs):
    # Runs last in the module: compares against digests taken before this cell's first quantization.
    fam, model = cell
    runs.optimize(model, "--method", "rtn", "--bits", "4", "--verify", "none")
    assert file_digests(model) == runs.before[model]
