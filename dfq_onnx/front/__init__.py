"""The front doors: the command line, the Python API, the Olive pass and onnxruntime-genai folders."""
