"""The diagonals' whitening rule end to end, on models built with each exporter's default options:
a pre-norm model (Llama, onnxruntime-genai builder defaults) is quantized as if the prior were never
trusted, a post-norm model (Gemma 2) as if it always were (README, "Free transforms")."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dfq_onnx.front.cli import main


def _quantize(model: Path, out: Path, setting: str | None) -> str:
    args = ["optimize", str(model), "-o", str(out / "q.onnx"), "--bits", "4", "--verify", "none", "--quiet"]
    if setting is not None:
        recipe = out.parent / f"{setting}.toml"
        recipe.write_text(f'[quant]\nbits = 4\nblock_size = 32\nsymmetric = true\n[method]\ndiagonal_prior = "{setting}"\n')
        args += ["--recipe", str(recipe)]
    out.mkdir(parents=True)
    assert main(args) == 0
    return "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.suffix != ".json")


@pytest.mark.parametrize("family,same_as,other", [("llama", "never", "always"), ("gemma2", "always", "never")])
def test_default_trusts_the_prior_only_behind_post_norms(tiny_family, tmp_path, family, same_as, other):
    model = tiny_family(family, "genai-fp32")
    default = _quantize(model, tmp_path / "default", None)
    assert default == _quantize(model, tmp_path / same_as, same_as)
    assert default != _quantize(model, tmp_path / other, other)  # the rule decides something on this model
