"""dfq-onnx: data-free low-bit weight quantization of exported LLMs for ONNX Runtime.

    import dfq_onnx
    report = dfq_onnx.quantize("model.onnx", "model.q4.onnx", bits=4, block_size=32)

`quantize`, `inspect`, `plan_budget`, `Report`, `Recipe`, `load_recipe`, `DfqError` and `Interrupted` are
imported on first use, so `import dfq_onnx` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "quantize": "api",
    "inspect": "api",
    "plan_budget": "api",
    "Report": "report",
    "SiteResult": "report",
    "Recipe": "config",
    "load_recipe": "config",
    "DfqError": "errors",
    "Interrupted": "errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dfq_onnx' has no attribute {name!r}")
