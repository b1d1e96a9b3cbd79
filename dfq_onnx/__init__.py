"""dfq-onnx: data-free low-bit weight quantization of exported LLMs for ONNX Runtime."""

__version__ = "0.1.0"
