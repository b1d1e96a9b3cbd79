"""Tiny Gemma 2 models built from a transformers config with random weights, exported to ONNX
in the three styles the tool must read. Built inside the tests; nothing is downloaded.

Shape choices: vocab (500) differs from every projection width (q 128, kv 64, qkv 256, mlp 352),
4 query heads share 2 KV heads (GQA 2:1), 2 layers so a sliding and a global layer both appear,
and the MLP width 352 is not a multiple of 64, so blocks of 64..256 exercise K padding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

VOCAB = 500
HIDDEN = 128
INTERMEDIATE = 352
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
LAYERS = 2

STYLES = ("genai-fp32", "genai-fp16", "genai-unfused", "dynamo", "torchscript")


def gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        sliding_window=16,
        query_pre_attn_scalar=HEAD_DIM,
        tie_word_embeddings=True,
    )


def hf_model(root: Path, seed: int = 0) -> Path:
    """A random Gemma 2 saved in Hugging Face format (norm gains randomised: zero gains hide bugs)."""
    from transformers import Gemma2ForCausalLM

    out = root / "hf"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(gemma2_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out)
    return out


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export(style: str, root: Path) -> Path:
    """Export the tiny model in one style; returns the .onnx path (cached under root/style)."""
    target = root / style / "model.onnx"
    if target.exists():
        return target
    hf = hf_model(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    if style.startswith("genai"):
        _genai(hf, target.parent, style)
    else:
        _torch_export(hf, target, dynamo=style == "dynamo")
    return target


def _torch_export(hf: Path, target: Path, dynamo: bool) -> None:
    from transformers import Gemma2ForCausalLM

    model = _LogitsOnly(Gemma2ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval())
    ids = torch.randint(0, VOCAB, (1, 12))
    mask = torch.ones_like(ids)
    kwargs = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    if dynamo:
        dims = {0: "batch", 1: "sequence"}
        torch.onnx.export(model, (ids, mask), target, dynamo=True, dynamic_shapes={"input_ids": dims, "attention_mask": dims}, **kwargs)
    else:
        dims = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            model, (ids, mask), target, dynamo=False, opset_version=17, dynamic_axes={"input_ids": dims, "attention_mask": dims}, **kwargs
        )


def _genai(hf: Path, out: Path, style: str) -> None:
    precision, provider = ("fp16", "cuda") if style == "genai-fp16" else ("fp32", "cpu")
    extra = ["windowed_kv_cache=false"]
    if style == "genai-unfused":
        extra.append("fuse_qkv=false")
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf), "-o", str(out), "-p", precision, "-e", provider,
        "-c", str(out / "cache"), "--extra_options", *extra,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        raise RuntimeError(f"genai builder failed for {style}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
