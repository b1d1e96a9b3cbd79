"""The `generated` statistics: each linear's input measured on sequences the model samples itself.

Nothing but the model's own files is read: the sequences start from the model's BOS token (its
config.json or genai_config.json beside it; without one, a token drawn from the vocabulary) and
continue by sampling the model's own next-token distribution (seeded), through ONNX Runtime on the
input graph itself (its KV cache where it has one). A second pass runs the sequences through a copy
of the graph whose outputs are the linears' inputs, one sequence at a time, and keeps only running
sums: E[x] and E[x^T x] per input, never the activations themselves.

Every input's dense moments are held from the measurement until its unit is planned: float64 K x K,
about 0.8 GB on Gemma 3 270M or SmolLM2-135M, but ~19 GB for a 2B model: not yet fit for large ones.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import MethodConfig
from ..errors import DfqError
from ..evaluation import models, sampling
from ..graph.sites import ModelSites
from ..quant import stats
from . import verify

MEMORY_CAP = 1 << 30  # bytes of running sums one pass over the samples holds; more inputs: more passes
# A graph without a KV cache reruns the prefix per token (quadratic): shorter samples. SmolLM2-135M int4 g128
# asym, Persuasion 8 windows: 64 x 64 tokens from a drawn first token, KL 0.130; 64 x 512 from BOS, 0.136.
CACHELESS_LENGTH = 64


@dataclasses.dataclass
class Measured:
    """Per linear, the statistics of its input; how they were made (for the report)."""

    inputs: dict[str, stats.Moments]
    samples: int
    length: int
    first_token: str
    seconds: float
    passes: int

    def note(self) -> str:
        return (
            f"statistics measured on {self.samples} x {self.length} tokens the model sampled itself ({self.first_token}; "
            f"no text read), {self.passes} pass(es), {self.seconds:.0f}s"
        )


def measure(input_path: Path, sites: ModelSites, inputs_of: dict[str, str], config: MethodConfig, threads: int | None = None,
            progress: Callable[[str], None] | None = None) -> Measured:  # fmt: skip
    """`inputs_of`: linear -> the graph value it reads. Returns the measured statistics by linear."""
    t0 = time.perf_counter()
    if sites.lm_head is None or sites.embedding is None:
        raise DfqError(
            f"--statistics generated samples the model's next tokens, and {input_path.name} has no token embedding and "
            "lm_head to sample with (an encoder?): use --statistics propagated"
        )
    model = models.load(input_path, threads)
    length = min(config.sample_length, models.context_length(model.folder) or config.sample_length)
    if model.cache_outputs() is None:
        length = min(length, CACHELESS_LENGTH)
    bos = models.bos_token_id(model.folder)
    ids = sampling.generate(model, config.samples, length, config.temperature, config.seed, bos, progress)
    layout = (model.head_dim, model.windows)
    del model
    values = sorted(set(inputs_of.values()))
    sums, passes = moments_of(input_path, values, ids, layout, threads, progress)
    by_value = {v: _moments(*sums[v], ids.size) for v in values}
    return Measured(
        inputs={lin: by_value[v] for lin, v in inputs_of.items()},
        samples=config.samples, length=length, seconds=time.perf_counter() - t0, passes=passes,
        first_token=f"from BOS token {bos}" if bos is not None else "from a token drawn from the vocabulary, no BOS in the model's config",
    )  # fmt: skip


def linear_inputs(sites: ModelSites, nodes) -> dict[str, str]:
    """Decoder linear -> the value it reads, for the inputs the method weighs by measured statistics
    (q/k/v, gate/up, down; o's input stays modelled through the attention, the lm_head's propagated)."""
    return {name: nodes[name].inputs[0].name for name, lin in sites.linears.items() if lin.layer is not None and lin.role.value != "o"}


def moments_of(path: Path, values: list[str], ids: np.ndarray, layout, threads: int | None, progress=None) -> tuple[dict, int]:
    """Per value, (sum x [d], sum x^T x [d, d]) in float64 over every position of `ids`; as many
    passes over the sequences as the running sums need to stay under MEMORY_CAP. `layout`: the
    head size and sliding-window caches the graph's empty caches are fed with (evaluation.models)."""
    graph, infos = typed_values(path, values)
    widths = {v: infos[v].type.tensor_type.shape.dim[-1].dim_value for v in values}
    groups, group, held = [], [], 0
    for v in values:
        size = widths[v] * widths[v] * 8
        if group and held + size > MEMORY_CAP:
            groups.append(group)
            group, held = [], 0
        group.append(v)
        held += size
    if group:
        groups.append(group)
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for g, names in enumerate(groups):
        session = verify.session(path, threads=threads, serialized=probe_bytes(graph, [infos[v] for v in names]))
        s1 = {v: torch.zeros(widths[v], dtype=torch.float64) for v in names}
        s2 = {v: torch.zeros(widths[v], widths[v], dtype=torch.float64) for v in names}
        for i, row in enumerate(ids):
            feed = verify.feeds(session, row[None, :], *layout)
            try:
                outs = session.run(names, feed)
            except Exception as exc:
                raise DfqError(f"ONNX Runtime cannot run {path.name} on its own samples: {verify.first_line(exc)}") from None
            for v, act in zip(names, outs):
                x = torch.from_numpy(np.ascontiguousarray(act.reshape(-1, act.shape[-1]), np.float32))
                s1[v] += x.sum(0, dtype=torch.float64)
                s2[v] += (x.t() @ x).to(torch.float64)  # one sequence in float32, summed in float64
            if progress:
                progress(f"measure sequence {i + 1}/{len(ids)}" + (f" (pass {g + 1}/{len(groups)})" if len(groups) > 1 else ""))
        sums.update({v: (s1[v], s2[v]) for v in names})
        del session
    return sums, len(groups)


def _moments(s1: torch.Tensor, s2: torch.Tensor, count: int) -> stats.Moments:
    mean = s1 / count
    return stats.Moments(mean, s2 / count - torch.outer(mean, mean))


def typed_values(path: Path, values: list[str]):
    """The graph (without its weights) and each value's type and shape, inferred where not stored."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (the stored shapes may still say)
        inferred = model
    known = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            known[info.name] = info
    if missing := [v for v in values if v not in known]:
        raise DfqError(f"cannot tell the width of {missing[0]} in {path.name} (no shape); use --statistics propagated")
    return model, known


def probe_bytes(model, outputs: list) -> bytes:
    """The graph with `outputs` (value infos) as its only outputs (logits and caches dropped, so ORT
    prunes the head), serialized without its weights (they are read from the model's folder)."""
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return model.SerializeToString()
