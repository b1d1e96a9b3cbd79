"""Graph passes that apply the method's plans (onnx-ir InPlacePass), and the built-in recipes (recipes/).

Each pass is one kind of edit: MatMulNBits or QDQ linears (emit_matmulnbits, emit_qdq), the quantized
embedding, folded gains and moved biases (float_edits), online rotations; apply.apply_plan runs a
unit's passes in the order that fixes the bytes. Nothing is imported here: reading the recipes
must not load the graph code.
"""
