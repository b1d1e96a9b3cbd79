"""Tiny decoder models built from transformers configs with random weights, exported to ONNX in the
styles the tool must read. Built inside the tests; nothing is downloaded.

Every family keeps vocab (500) different from every projection width, fused widths included (the
genai builder takes any linear with out_features == vocab as the lm_head), has GQA and 2 layers,
hidden 128 (a multiple of 64) and an MLP width that is an odd multiple of 32, so 64-wide online
rotations fit the hidden width, only 32-wide ones fit the MLP width, and blocks of 64..256 exercise
K padding.

The Gemma 2 constants below are what `tiny(style)` builds: 4 query heads share 2 KV heads
(GQA 2:1), a sliding and a global layer, MLP width 352.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from build_gemma3_270m import flatten_rope_config  # noqa: E402

VOCAB = 500
HIDDEN = 128
INTERMEDIATE = 352
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
LAYERS = 2

# What `tiny(style)` builds (Gemma 2 only): its genai styles keep windowed_kv_cache=false.
STYLES = ("genai-fp32", "genai-fp16", "genai-unfused", "dynamo", "torchscript")
_TINY_STYLE = {"genai-fp32": "genai-fullkv", "genai-fp16": "genai-fp16-fullkv", "genai-unfused": "genai-unfused-fullkv"}

# The family matrix: each exporter with its default options, plus the common variants.
FAMILY_STYLES = ("genai-fp32", "genai-fp16", "genai-unfused", "genai-fullkv", "dynamo", "torchscript", "optimum")


class ExportFailed(Exception):
    """The exporter raised on this family; the message is its own error."""


@dataclasses.dataclass(frozen=True)
class Limitation:
    """A declared, expected limitation of one cell of the matrix: where it shows ("export": the
    exporter fails; "cpu": the export runs nowhere but on CUDA), why, and a piece of the error that
    shows it. Anything else that fails in a cell fails its tests; a declared cell whose limitation
    no longer shows fails too, so this table and the README's stay true."""

    stage: str  # "export" or "cpu"
    reason: str
    error: str  # found in the exporter's or ONNX Runtime's message when the limitation shows

    def shown_by(self, message: str) -> bool:
        return self.error in message


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # transformers class, also the builder's architecture key
    config_class: str
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    hidden: int = HIDDEN
    layers: int = LAYERS
    vocab: int = VOCAB
    qkv_bias: bool = False  # random non-zero q/k/v biases (Qwen 2)
    qk_norm: bool = False
    fused: bool = False  # the transformers module itself packs q|k|v and gate|up (Phi 3)
    gemma_norms: bool = False  # RMSNorm computes (1 + w) * x: w randomised around 0, not 1
    rotary_fraction: float = 1.0
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def sliding(self) -> bool:
        """Has layers marked sliding_attention: the builder's windowed KV cache applies to those."""
        return "sliding_attention" in (getattr(self.config(), "layer_types", None) or ())

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def widths(self) -> dict[str, tuple[int, int]]:
        """(K, N) of each role's weight."""
        q, kv, i, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate, self.hidden
        return {
            "q": (h, q), "k": (h, kv), "v": (h, kv), "qkv": (h, q + 2 * kv), "o": (q, h),
            "gate": (h, i), "up": (h, i), "gate_up": (h, 2 * i), "down": (i, h), "lm_head": (h, self.vocab),
        }  # fmt: skip

    def config(self):
        import transformers

        kwargs = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=256,
            tie_word_embeddings=self.tied,
            architectures=[self.model_class],
        )
        if self.config_class != "Phi3Config":  # Phi 3 derives head_dim from hidden / heads
            kwargs["head_dim"] = self.head_dim
        config = getattr(transformers, self.config_class)(**kwargs, **dict(self.extra))
        assert (getattr(config, "head_dim", None) or self.hidden // self.heads) == self.head_dim
        assert self.vocab not in {n for _, n in self.widths.values() if n != self.vocab}, "vocab equals a width"
        return config


_PHI_TOKENS = (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0))  # Phi 3's defaults exceed the vocab
FAMILIES = {
    f.name: f
    for f in [
        Family("llama", "LlamaForCausalLM", "LlamaConfig", 4, 2, 32, 352, tied=False, extra=(
            ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        )),
        Family("llama-tied", "LlamaForCausalLM", "LlamaConfig", 4, 2, 32, 352, tied=True),
        # Mistral slides every layer: transformers' config has no layer_types, so no genai-fullkv cell.
        Family("mistral", "MistralForCausalLM", "MistralConfig", 8, 2, 16, 416, tied=False, extra=(("sliding_window", 16),)),
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", 4, 2, 32, 352, tied=False, qkv_bias=True),
        Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", 4, 2, 64, 352, tied=True, qk_norm=True),
        Family("phi3", "Phi3ForCausalLM", "Phi3Config", 4, 2, 32, 352, tied=False, fused=True, extra=(
            ("original_max_position_embeddings", 256), *_PHI_TOKENS,  # == max_position_embeddings: no LongRoPE
        )),
        # Rotary width 48 of head 64: ORT's CPU GroupQueryAttention needs rotary / 2 to be a multiple of 8.
        Family("phi4mini", "Phi3ForCausalLM", "Phi3Config", 2, 1, 64, 352, tied=True, fused=True, rotary_fraction=0.75, extra=(
            ("original_max_position_embeddings", 256), ("partial_rotary_factor", 0.75), *_PHI_TOKENS,
        )),
        Family("gemma2", "Gemma2ForCausalLM", "Gemma2Config", HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, tied=True,
               gemma_norms=True, extra=(("sliding_window", 16), ("query_pre_attn_scalar", HEAD_DIM))),
        # Gemma 3: head_dim * heads (256) != hidden, one KV head (as in Gemma 3 270M), q/k norms.
        Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", 4, 1, 64, 288, tied=True, qk_norm=True, gemma_norms=True,
               extra=(("sliding_window", 16), ("query_pre_attn_scalar", 64), ("layer_types", ["sliding_attention", "full_attention"]))),
    ]
}  # fmt: skip


_OPTIMUM = Limitation(
    "export",
    "optimum-onnx's only release (0.1.0) requires transformers < 4.58: it is not installed, and cannot be "
    "imported, beside transformers 5",
    "optimum-onnx cannot be imported beside transformers 5",
)
_FP16_QK_NORM = Limitation(
    "cpu",
    "the builder's fp16 (CUDA) export hands the q/k norms to GroupQueryAttention, whose ONNX Runtime CPU "
    "kernel rejects them: the input itself does not run on CPU, so its logits cannot be compared here",
    "GroupQueryAttention (CPU): q_norm_weight / k_norm_weight inputs are not supported",
)
# Every declared limitation of the matrix (measured by running every cell; README "Support" table).
UNSUPPORTED: dict[tuple[str, str], Limitation] = {
    **{(f, "optimum"): _OPTIMUM for f in FAMILIES},
    ("qwen3", "genai-fp16"): _FP16_QK_NORM,
    ("gemma3", "genai-fp16"): _FP16_QK_NORM,
}


def cells() -> list[tuple[str, str]]:
    """Every (family, style) of the matrix; genai-fullkv only where a sliding window exists."""
    return [(f, s) for f, fam in FAMILIES.items() for s in FAMILY_STYLES if s != "genai-fullkv" or fam.sliding]


def hf_model(family: Family, root: Path, seed: int = 0) -> Path:
    """A random model saved in Hugging Face format under root/hf.

    Norm gains are randomised (gains of exactly one hide folding bugs) to an effective 1 + N(0, 0.3):
    Gemma stores w of (1 + w). Qwen 2's q/k/v biases get random non-zero values for the same reason.
    """
    import transformers

    out = root / "hf"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(family.config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
                if not family.gemma_norms:
                    param.add_(1.0)
            elif family.qkv_bias and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0.0, 0.2)
    model.save_pretrained(out)
    _word_tokenizer(family.vocab).save_pretrained(out)
    return out


def _word_tokenizer(vocab: int):
    """A word-level tokenizer over the vocab: the genai builder saves the model's tokenizer and stops without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2")


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export(style: str, root: Path) -> Path:
    """The tiny Gemma 2 of `tiny(style)`: its genai styles are built with windowed_kv_cache=false."""
    return build("gemma2", _TINY_STYLE.get(style, style), root)


def build(family: str, style: str, root: Path) -> Path:
    """Export one family in one style; returns the .onnx path (cached under root/family/style).

    genai styles are `genai-` plus options: fp16 (-p fp16 -e cuda), unfused (fuse_qkv=false),
    fullkv (windowed_kv_cache=false); fp32 alone is the builder's defaults.
    Raises ExportFailed with the exporter's own error where it fails on the family (declared
    limitations: UNSUPPORTED).
    """
    fam = FAMILIES[family]
    base = root / family
    target = base / style / "model.onnx"
    refusal = target.parent / "export-failed.txt"  # a failed export is not retried in the same run
    if target.exists():
        return target
    if refusal.exists():
        raise ExportFailed(refusal.read_text())
    hf = hf_model(fam, base)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if style.startswith("genai"):
            _genai(hf, target.parent, style)
        elif style == "optimum":
            _optimum(hf, target.parent)
        else:
            _torch_export(fam, hf, target, dynamo=style == "dynamo")
    except ExportFailed as exc:
        refusal.write_text(str(exc))
        raise
    return target


def _torch_export(fam: Family, hf: Path, target: Path, dynamo: bool) -> None:
    import transformers

    model = _LogitsOnly(getattr(transformers, fam.model_class).from_pretrained(hf, dtype=torch.float32).eval())
    ids = torch.randint(0, fam.vocab, (1, 12))
    mask = torch.ones_like(ids)
    dims = {0: "batch", 1: "sequence"}
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    if dynamo:
        kwargs.update(dynamo=True, dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    else:
        kwargs.update(dynamo=False, opset_version=17, dynamic_axes={"input_ids": dims, "attention_mask": dims})
    try:
        torch.onnx.export(model, (ids, mask), target, **kwargs)
    except Exception as exc:
        raise ExportFailed(f"torch.onnx.export(dynamo={dynamo}): {type(exc).__name__}: {str(exc)[:600]}") from exc


def _genai(hf: Path, out: Path, style: str) -> None:
    options = style.split("-")[1:]
    precision, provider = ("fp16", "cuda") if "fp16" in options else ("fp32", "cpu")
    extra = []
    if "unfused" in options:
        extra.append("fuse_qkv=false")
    if "fullkv" in options:
        extra.append("windowed_kv_cache=false")
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(_builder_source(hf)), "-o", str(out), "-p", precision, "-e", provider, "-c", str(out / "cache"),
    ]  # fmt: skip
    if extra:
        cmd += ["--extra_options", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
        raise ExportFailed(f"onnxruntime-genai builder ({style}): {(errors or lines or ['no output'])[-1]}")


def _builder_source(hf: Path) -> Path:
    """hf itself, or beside it a copy whose config has rope settings flat.

    transformers 5 nests rope settings per layer type (Gemma 3); onnxruntime-genai 0.18 reads
    rope_parameters["rope_type"] and stops with KeyError 'rope_type' otherwise.
    """
    cfg = json.loads((hf / "config.json").read_text())
    flat = flatten_rope_config(cfg)
    if flat == cfg:
        return hf
    src = hf.with_name("hf-genai")
    if not (src / "config.json").exists():
        src.mkdir(exist_ok=True)
        for p in hf.iterdir():
            if p.name != "config.json" and not (src / p.name).exists():
                os.symlink(p.resolve(), src / p.name)
        (src / "config.json").write_text(json.dumps(flat, indent=2))
    return src


def _optimum(hf: Path, out: Path) -> None:
    """optimum-onnx's text-generation-with-past export (past_key_values.* inputs)."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        # Its only release (0.1.0) requires transformers<4.58: the test extras leave it out, and installed
        # beside 5.x it fails to import ("cannot import name 'get_parameter_dtype' from 'transformers.modeling_utils'").
        raise ExportFailed(f"optimum-onnx cannot be imported beside transformers 5: {type(exc).__name__}: {exc}") from exc
    try:
        main_export(str(hf), output=out, task="text-generation-with-past", device="cpu", do_validation=False)
    except Exception as exc:
        raise ExportFailed(f"optimum-onnx main_export: {type(exc).__name__}: {str(exc)[:600]}") from exc


def with_nan_in_head(src: Path, folder: Path) -> tuple[Path, str]:
    """A copy of `src` in `folder` (external data) whose lm_head weight holds one NaN: (its path, the
    weight's initializer name)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import dfq_onnx

    sites = dfq_onnx.inspect(src)
    name = sites.linears[sites.lm_head].weight.initializer
    m = onnx.load(str(src))
    tensor = next(t for t in m.graph.initializer if t.name == name)
    values = numpy_helper.to_array(tensor).copy()
    values[3, 5] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, name))
    folder.mkdir(parents=True)
    model = folder / "model.onnx"
    onnx.save_model(m, str(model), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    return model, name


PLANTED_TOKENS = 8  # the tokens the planted model writes
PLANTED_CHANNELS = 16  # the residual channels only those tokens' embeddings use


def planted(root: Path) -> Path:
    """A tiny pre-norm Llama (onnxruntime-genai builder defaults) whose own text differs from what its
    weights say on average: PLANTED_TOKENS tokens (BOS among them) carry their energy in
    PLANTED_CHANNELS residual channels no other token uses, and its head prefers those tokens whatever
    came before, so everything it writes is loud in channels a prior uniform over the vocabulary
    (the propagated statistics of a pre-norm model) sees as quiet. Returns the .onnx path."""
    import transformers

    target = root / "planted" / "model.onnx"
    if target.exists():
        return target
    fam = FAMILIES["llama"]
    hf = root / "planted-hf"
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(fam.config()).eval()
    g = torch.Generator().manual_seed(7)
    loud = torch.arange(PLANTED_CHANNELS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3, generator=g)
        tokens = torch.tensor([1, *range(3, 3 + PLANTED_TOKENS - 1)])  # BOS (1) and the next ones
        pattern = torch.randn(PLANTED_CHANNELS, generator=g).sign()
        emb = model.model.embed_tokens.weight
        emb[:, loud] = 0.0
        emb[tokens[:, None], loud] = 0.5 * pattern + 0.1 * torch.randn(len(tokens), PLANTED_CHANNELS, generator=g)
        head = model.lm_head.weight  # [vocab, hidden]
        head[tokens[:, None], loud] += 2.0 * pattern + 0.5 * torch.randn(len(tokens), PLANTED_CHANNELS, generator=g)
    model.save_pretrained(hf)
    _word_tokenizer(fam.vocab).save_pretrained(hf)
    target.parent.mkdir(parents=True, exist_ok=True)
    _genai(hf, target.parent, "genai-fp32")
    return target
