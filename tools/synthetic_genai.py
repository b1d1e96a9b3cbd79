"""The graph of an onnxruntime-genai builder export of Gemma 2 at real widths and full depth,
without the builder ever holding the full model.

The builder loads every weight into RAM, so it is run on a model of the real widths with only
TEMPLATE_LAYERS decoder layers (parameters zero: make_synthetic replaces every weight anyway).
The decoder layers of that graph are then replicated to the requested depth: layer j copies
layer 1 or layer 2, whichever has j's attention kind (Gemma 2 alternates sliding-window and
global layers, so the two differ only in GroupQueryAttention's local_window_size), with node,
value and weight names renumbered and one KV-cache input and output pair per added layer.
The result is the graph the builder makes for the full model (a test checks it node for node
on a small shape).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE_LAYERS = 3  # layers 1 and 2: one of each attention kind, both fed by a layer before them
_LAYER = re.compile(r"layers\.(\d+)")
_CACHE = re.compile(r"(past_key_values|present)\.(\d+)\.")
_NODE_LAYER = re.compile(r"^/model/layers\.(\d+)/")


def build_template(config, dtype: str, work: Path) -> Path:
    """The builder's graph of a TEMPLATE_LAYERS-deep copy of `config` (all of it when shallower); returns its model.onnx."""
    return run_builder(config, dtype, work, min(config.num_hidden_layers, TEMPLATE_LAYERS))


def run_builder(config, dtype: str, work: Path, layers: int) -> Path:
    """Run the builder on `config` cut to `layers` layers, with zero parameters; returns its model.onnx."""
    import copy

    import torch
    from accelerate import init_empty_weights
    from transformers import Gemma2ForCausalLM

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(layers)]
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with init_empty_weights():
        model = Gemma2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch_dtype)  # no random init: zeros are written below
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    hf = work / "hf"
    model.save_pretrained(hf)
    del model
    out = work / "onnx"
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(hf), "-o", str(out), "-p", dtype, "-e", "cuda",
        "-c", str(work / "cache"), "--extra_options", "windowed_kv_cache=false",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        raise RuntimeError(f"the onnxruntime-genai builder failed:\n{proc.stderr[-2000:]}")
    shutil.rmtree(hf, ignore_errors=True)
    return out / "model.onnx"


def _renamer(mapping: dict[int, int], cache: dict[int, int]):
    def rename(name: str) -> str:
        name = _LAYER.sub(lambda m: f"layers.{mapping.get(int(m.group(1)), int(m.group(1)))}", name)
        return _CACHE.sub(lambda m: f"{m.group(1)}.{cache.get(int(m.group(2)), int(m.group(2)))}.", name)

    return rename


def _layer_of(node) -> int | None:
    m = _NODE_LAYER.match(node.name or "")
    return int(m.group(1)) if m else None


def replicate_layers(model, layers: int) -> None:
    """Grow a TEMPLATE_LAYERS-deep builder graph to `layers` decoder layers, in place."""
    import onnx_ir as ir

    graph = model.graph
    built = TEMPLATE_LAYERS
    if layers <= built:
        return  # build_template made the whole model
    by_layer: dict[int, list] = {}
    for node in graph:
        idx = _layer_of(node)
        if idx is not None and idx < built:
            by_layer.setdefault(idx, []).append(node)
    tail = [n for n in graph if _after_layers(n)]
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        values.update({o.name: o for o in node.outputs if o.name})

    new_nodes = []
    for j in range(built, layers):
        t = 1 if j % 2 == 1 else 2
        rename = _renamer({t: j, t - 1: j - 1}, {t: j})
        for node in by_layer[t]:
            inputs = [None if v is None else _copy_input(v, rename, values, graph) for v in node.inputs]
            outputs = [ir.Value(name=rename(o.name), type=o.type, shape=o.shape) if o.name else ir.Value(name="") for o in node.outputs]
            attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
            copy = ir.Node(node.domain, node.op_type, inputs, attrs, outputs=outputs, name=rename(node.name), version=node.version)
            values.update({o.name: o for o in copy.outputs if o.name})
            new_nodes.append(copy)
    # The final norm and the lm_head read the last layer: renumber what they reference.
    rename_tail = _renamer({built - 1: layers - 1, built: layers}, {})
    for node in tail:
        node.name = rename_tail(node.name)
        for i, v in enumerate(node.inputs):
            if v is None or not v.name or rename_tail(v.name) == v.name:
                continue
            if v.name in graph.initializers:  # the final norm's own gain: renamed in place
                graph.initializers.pop(v.name)
                v.name = rename_tail(v.name)
                graph.register_initializer(v)
            else:
                node.replace_input_with(i, values[rename_tail(v.name)])
        for o in node.outputs:
            if o.name and o not in graph.outputs:
                o.name = rename_tail(o.name)
    graph.insert_before(tail[0], new_nodes)
    _extend_cache_io(graph, built, layers, values)


def _after_layers(node) -> bool:
    """Nodes that run after the decoder layers (final norm, lm_head, softcap)."""
    name = node.name or ""
    return name.startswith("/lm_head") or "final_norm" in name


def _copy_input(value, rename, values, graph):
    import onnx_ir as ir

    name = rename(value.name)
    if name == value.name:
        return value  # shared: attention-mask subgraph outputs, rotary caches
    if name in values:
        return values[name]
    if value.name in graph.initializers:  # a weight of the template layer: same shape, renamed
        copy = ir.Value(name=name, type=value.type, shape=value.shape, const_value=value.const_value)
        graph.register_initializer(copy)
        values[name] = copy
        return copy
    if value in graph.inputs:  # a KV-cache input of the template layer
        copy = ir.Value(name=name, type=value.type, shape=value.shape)
        values[name] = copy
        return copy
    raise KeyError(f"no value {name} for the copy of {value.name}")


def _extend_cache_io(graph, built: int, layers: int, values) -> None:
    """past_key_values.j.* inputs and present.j.* outputs in the builder's order (all keys, then all values)."""
    for io, prefix in ((graph.inputs, "past_key_values"), (graph.outputs, "present")):
        fixed = [v for v in io if not v.name.startswith(prefix + ".")]
        keys = [values[f"{prefix}.{j}.key"] for j in range(layers)]
        vals = [values[f"{prefix}.{j}.value"] for j in range(layers)]
        io.clear()
        io.extend(fixed + keys + vals)


def write_genai_config(template_dir: Path, target_dir: Path, layers: int) -> None:
    """The builder's genai_config.json with the full depth."""
    config = json.loads((template_dir / "genai_config.json").read_text())
    config["model"]["decoder"]["num_hidden_layers"] = layers
    (target_dir / "genai_config.json").write_text(json.dumps(config, indent=4))
