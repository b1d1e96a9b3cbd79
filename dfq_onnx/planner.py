"""From the graph to plans: read one unit's weights, gains and biases, run the method, and turn
what it returned into a UnitPlan (plain arrays). The graph is only read here; passes write it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir
import torch

from . import fast_path, methods
from .config import Method, Prior, QuantFormat, Recipe, TokenPrior
from .errors import DfqError
from .graph import load
from .graph.sites import Linear, ModelSites, Role
from .plan import OnlineRotation, QuantizedWeight, UnitPlan
from .quant import grid, proxy, stats
from .report import SiteResult


def plan_units(sites: ModelSites, graph: ir.Graph | None = None) -> list[methods.Unit]:
    """One unit per layer (attention + MLP), then any remaining linears outside the layers."""
    units = []
    for layer in sites.layers():
        members = [lin for lin in sites.linears.values() if lin.layer == layer and lin.role != Role.LM_HEAD]
        att = next((a for a in sites.attentions if a.layer == layer), None)
        mlp = next((m for m in sites.mlps if m.layer == layer), None)
        foldable = {
            g.initializer
            for g in (att.input_norm if att else None, mlp.input_norm if mlp else None)
            if g is not None and g.exclusive and (graph is None or _only_used_by_its_norm(graph, g.initializer))
        }
        units.append(methods.Unit(f"layer {layer}", layer, members, att, mlp, foldable))
    loose = [lin for lin in sites.linears.values() if lin.layer is None and lin.role == Role.OTHER]
    if loose:
        units.append(methods.Unit("other linears", None, loose))
    return units


def head_unit(sites: ModelSites, recipe: Recipe) -> methods.Unit | None:
    """The lm_head (and the embedding, quantized with it) when the recipe quantizes them."""
    if recipe.lm_head.bits is None or sites.lm_head is None or recipe.float_output:
        return None
    return methods.Unit(methods.HEAD_LABEL, None, [sites.linears[sites.lm_head]], embedding=sites.embedding, head_norm=sites.lm_head_norm)


def _only_used_by_its_norm(graph: ir.Graph, name: str) -> bool:
    """A gain initializer shared with other nodes cannot be rewritten for one of them."""
    return len(graph.initializers[name].uses()) == 1


@dataclasses.dataclass
class Planned:
    plan: UnitPlan
    residual: stats.Moments | None  # the statistics the next unit starts from
    rounded_float: dict[str, np.ndarray]  # linear -> the float W[K, N] that was rounded (exactness check only)


class LazyWeights(Mapping):
    """A unit's weights, each read when first used and then kept: the MLP's are not resident while the
    attention is rounded (on the 2B shape that is a quarter of a layer's peak memory)."""

    def __init__(self, names, read: Callable[[str], torch.Tensor], held: dict[str, torch.Tensor] | None = None):
        self._held = dict(held or {})
        self._names = [*names, *(name for name in self._held if name not in names)]
        self._read = read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._held:
            if name not in self._names:
                raise KeyError(name)
            self._held[name] = self._read(name)
        return self._held[name]

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Planner:
    def __init__(self, graph: ir.Graph, sites: ModelSites, recipe: Recipe, device: str, keep_float: bool):
        self.graph, self.sites, self.recipe, self.device = graph, sites, recipe, device
        self.keep_float = keep_float  # the exactness check needs the transformed float weights
        self.nodes = {node.name: node for node in graph}

    # -- reading

    def weight(self, lin: Linear, as_stored: bool = False) -> torch.Tensor:
        """W[K, N], float32 and contiguous; with `as_stored`, W as it is stored: its own float dtype,
        and a weight stored [N, K] as a transposed view (round-to-nearest reads it piece by piece)."""
        arr = load.read_array(self.graph.initializers[lin.weight.initializer].const_value)
        load.check_array_finite(arr, lin.weight.initializer)
        if as_stored:
            w = _stored_tensor(arr)
            return w.t() if lin.weight.transposed else w
        w = torch.from_numpy(arr.astype(np.float32, copy=False))
        return w.t().contiguous() if lin.weight.transposed else w

    def column_chunks(self, initializer: str, stored_transposed: bool, columns: int):
        """W[K, N] (the initializer, or its transpose when `stored_transposed`) as float32 [K, <= columns]
        pieces read from storage one at a time, rows of W^T in stored order: never whole in float32."""
        tensor = self.graph.initializers[initializer].const_value
        for rows in load.iter_rows(tensor, transposed=not stored_transposed, rows_per_block=columns):
            load.check_array_finite(rows, initializer)
            yield torch.from_numpy(rows).t().contiguous().to(self.device)

    def _head_chunks(self, unit: methods.Unit, linears: dict[str, Linear]):
        """The head unit's reader of column pieces: the lm_head's W, or the untied embedding table as
        W[hidden, vocab] (stored [vocab, hidden] unless `transposed`)."""

        def read(name: str, columns: int):
            if name in linears:
                return self.column_chunks(linears[name].weight.initializer, linears[name].weight.transposed, columns)
            return self.column_chunks(unit.embedding.initializer, not unit.embedding.transposed, columns)

        return read

    def activation_dtype(self, lin: Linear) -> np.dtype:
        node = self.nodes[lin.node]
        dtype = node.outputs[0].dtype or node.inputs[0].dtype
        if dtype == ir.DataType.FLOAT16:
            return np.dtype(np.float16)
        if dtype in (None, ir.DataType.FLOAT):
            return np.dtype(np.float16) if lin.weight.dtype == "FLOAT16" else np.dtype(np.float32)
        raise DfqError(f"{lin.node}: activations of type {dtype.name} are not supported; use fp32 or fp16")

    def bias(self, lin: Linear) -> torch.Tensor | None:
        """The linear's output bias when it is an initializer we may rewrite (read by that Add alone)."""
        if lin.bias is None or lin.bias not in self.graph.initializers or len(self.graph.initializers[lin.bias].uses()) != 1:
            return None
        arr = load.read_array(self.graph.initializers[lin.bias].const_value).astype(np.float32).reshape(-1)
        return torch.from_numpy(arr)

    def gains(self, unit: methods.Unit) -> dict[str, torch.Tensor]:
        """Multiplicative norm gains in front of the unit's linears (1 + w where the graph adds the 1)."""
        out = {}
        norms = []
        if unit.attention:
            norms += [unit.attention.input_norm, unit.attention.output_norm]
        if unit.mlp:
            norms += [unit.mlp.input_norm, unit.mlp.output_norm]
        norms.append(unit.head_norm)
        for norm in norms:
            if norm is not None:
                out[norm.initializer] = self._gain(norm)
        return out

    def _gain(self, norm) -> torch.Tensor:
        arr = load.read_array(self.graph.initializers[norm.initializer].const_value).astype(np.float32).reshape(-1)
        return torch.from_numpy(arr + 1.0 if norm.plus_one else arr)

    def initial_statistics(self) -> stats.Moments | None:
        """Residual-stream statistics at the first layer, from the embedding table (for the propagated prior)."""
        method = self.recipe.method
        emb = self.sites.embedding
        if method.name != Method.CAFEQ or method.prior != Prior.PROPAGATED or emb is None:
            return None
        uniform = self._embedding_moments()
        post_normed = all(p.output_norm is not None for p in (*self.sites.attentions, *self.sites.mlps))
        if self.sites.lm_head is None or not (method.token_prior == TokenPrior.SELF or (method.token_prior == TokenPrior.POST_NORM and post_normed)):
            return uniform
        weights = self.token_weights(uniform)
        return self._embedding_moments(weights, center=uniform.mean / self.sites.embedding_scale)

    def _embedding_moments(self, weights: torch.Tensor | None = None, center: torch.Tensor | None = None) -> stats.Moments:
        emb = self.sites.embedding
        rows = load.iter_rows(self.graph.initializers[emb.initializer].const_value, emb.transposed, rows_per_block=1024)
        return stats.embedding_moments(rows, self.sites.embedding_scale, emb.vocab, self.device, weights, center)

    def token_weights(self, residual: stats.Moments) -> torch.Tensor:
        """The token distribution the prior starts from (TokenPrior.SELF): the statistics carried through
        every layer from `residual` (no rounding), then the model's next-token probabilities at their
        mean final state (stats.token_distribution)."""
        label = ""
        try:  # a bad weight is met here first: say which pass and unit read it
            for unit in plan_units(self.sites, self.graph):
                label = unit.label
                residual = self.statistics(unit, residual)
            label = methods.HEAD_LABEL
            head = self.sites.linears[self.sites.lm_head]
            gain = self._gain(self.sites.lm_head_norm) if self.sites.lm_head_norm is not None else None
            pieces = self.column_chunks(head.weight.initializer, head.weight.transposed, methods.HEAD_CHUNK)
            return stats.token_distribution(residual, None if gain is None else gain.to(self.device), pieces)
        except DfqError as exc:
            raise DfqError(f"{label} (the prior's token pass): {exc}") from None

    # -- planning

    def plan(self, unit: methods.Unit, residual: stats.Moments | None) -> Planned:
        t0 = time.perf_counter()
        head = unit.is_head
        fmt = self._format(head)
        formats = {lin.node: self.site_format(lin, head) for lin in unit.linears}
        excluded = {lin.node for lin in unit.linears if not head and self.recipe.excludes(lin.node, lin.role.value)}
        # RTN reads blocks in any layout and dtype; the head is read in float32 like ORT's quantizer does.
        as_stored = self.recipe.method.name == Method.RTN and not head
        linears = {lin.node: lin for lin in unit.linears}
        weights = LazyWeights(linears, lambda name: self.weight(linears[name], as_stored=as_stored))
        dtypes = {lin.node: self.activation_dtype(lin) for lin in unit.linears}
        notes: list[str] = []
        embedding_ok = head and self._embedding_quantizable(unit, fmt, notes)
        table = unit.embedding.initializer if embedding_ok and not unit.embedding.tied else None  # untied: its own codes
        scale_dtypes = {name: _torch_dtype(dt) for name, dt in dtypes.items()}
        read = lambda name: (self._embedding_table(unit) if name == table else weights[name]).to(self.device)  # noqa: E731
        device_weights = LazyWeights([*linears, *([table] if table else [])], read)
        if table is not None:
            scale_dtypes[table] = scale_dtypes[unit.linears[0].node]
        data = methods.UnitInput(
            weights=device_weights,
            scale_dtypes=scale_dtypes,
            gains=self._device_gains(unit),
            biases=self._device_biases(unit),
            residual=residual,
            keep_float=self.recipe.float_output or self.keep_float or bool(excluded),
            formats={name: f for name, f in formats.items() if f != fmt},
            float_sites=frozenset(excluded),
            column_chunks=self._head_chunks(unit, linears) if head else None,
        )
        result = methods.method_for(self.recipe.method)(unit, data, fmt, self.recipe.method)
        seconds = (time.perf_counter() - t0) / max(len(unit.linears), 1)
        plan = UnitPlan(label=unit.label, notes=notes + result.notes)
        rounded_float = {}
        for lin in unit.linears:
            q = result.quantized[lin.node]
            float_weight = result.float_weights.get(lin.node)
            if lin.node in excluded:  # kept in float: the transformed weight, so the layer computes what it did
                plan.sites.append(_float_site(lin, seconds, result.transforms.get(lin.node, [])))
                plan.float_weights[lin.node] = _numpy(weights[lin.node] if float_weight is None else float_weight)
                continue
            errors = result.errors.get(lin.node)  # the weight is read again only where the method gave no errors
            plan.sites.append(
                _site_result(lin, weights[lin.node] if errors is None else None, q, formats[lin.node], seconds,
                             result.transforms.get(lin.node, []), errors, dtypes[lin.node])
            )  # fmt: skip
            if self.recipe.float_output:
                plan.float_weights[lin.node] = _numpy(weights[lin.node] if float_weight is None else float_weight)
            else:
                plan.quantized[lin.node] = _quantized(q, dtypes[lin.node])
                if float_weight is not None:
                    rounded_float[lin.node] = _numpy(float_weight)
        if table is not None:
            plan.embedding = _quantized(result.quantized[table], dtypes[unit.linears[0].node])
        elif embedding_ok:  # tied: the lm_head's rounded weight is the table
            plan.embedding, plan.embedding_tied = plan.quantized[unit.linears[0].node], True
        plan.gains = {name: _numpy(g) for name, g in result.changed.items()}
        plan.biases = {name: _numpy(b) for name, b in result.biases.items()}
        plan.online = self._online(result.online, dtypes)
        return Planned(plan, result.residual, rounded_float)

    def statistics(self, unit: methods.Unit, residual: stats.Moments | None) -> stats.Moments | None:
        """The statistics after `unit`, equal to the residual `plan(unit, residual)` returns, without
        optimising it (the driver of a distributed run chains these ahead of the workers)."""
        if residual is None or unit.is_head:
            return None
        linears = {lin.node: lin for lin in unit.linears}
        data = methods.UnitInput(
            weights=LazyWeights(linears, lambda name: self.weight(linears[name]).to(self.device)),  # read on first use, as plan() does
            scale_dtypes={},
            gains=self._device_gains(unit),
            biases=self._device_biases(unit),
            residual=residual,
        )
        return methods.statistics(unit, data, self.recipe.method)

    def site_statistics(self, unit: methods.Unit, residual: stats.Moments | None):
        """Each linear of `unit` with the statistics that weigh its rounding error, and the residual
        statistics after it (what a budget allocation estimates its losses from; nothing is rounded)."""
        data = methods.UnitInput(
            weights={lin.node: self.weight(lin).to(self.device) for lin in unit.linears},
            scale_dtypes={lin.node: _torch_dtype(self.activation_dtype(lin)) for lin in unit.linears},
            gains=self._device_gains(unit),
            biases=self._device_biases(unit),
            residual=residual,
        )
        return methods.site_statistics(unit, data, self.recipe.method)

    def _device_gains(self, unit: methods.Unit) -> dict[str, torch.Tensor]:
        return {name: g.to(self.device) for name, g in self.gains(unit).items()}

    def _device_biases(self, unit: methods.Unit) -> dict[str, torch.Tensor]:
        return {lin.node: b.to(self.device) for lin in unit.linears if (b := self.bias(lin)) is not None}

    def _format(self, head: bool) -> QuantFormat:
        quant = self.recipe.quant
        if not head:
            return quant
        fmt = QuantFormat(self.recipe.lm_head.bits, quant.block_size, quant.symmetric)
        for override in self.recipe.overrides:  # only those naming the lm_head: the policy sets its bits
            fmt = override.apply(fmt) if "lm_head" in override.roles else fmt
        return fmt

    def site_format(self, lin: Linear, head: bool) -> QuantFormat:
        return self._format(True) if head else self.recipe.format_for(lin.role.value, lin.layer, len(self.sites.layers()))

    def _embedding_quantizable(self, unit: methods.Unit, fmt: QuantFormat, notes: list[str]) -> bool:
        emb, lin = unit.embedding, unit.linears[0]
        if emb is None:
            return False
        if lin.k % fmt.block_size:
            notes.append(f"embedding kept in float: hidden size {lin.k} is not a multiple of the block size {fmt.block_size}")
            return False
        return True

    def _embedding_table(self, unit: methods.Unit) -> torch.Tensor:
        """The untied embedding table as W[hidden, vocab]: it is rounded like the lm_head."""
        emb = unit.embedding
        arr = load.read_array(self.graph.initializers[emb.initializer].const_value)
        e = torch.from_numpy(arr.astype(np.float32, copy=False))
        return e if emb.transposed else e.t().contiguous()

    def _online(self, online: dict[str, torch.Tensor], dtypes: dict[str, np.dtype]) -> list[OnlineRotation]:
        """One rotation per activation, shared by the linears of the unit that read it."""
        groups: dict[int, list[str]] = {}
        for name in online:
            groups.setdefault(id(self.nodes[name].inputs[0]), []).append(name)
        out = []
        for names in groups.values():
            lin = self.sites.linears[names[0]]
            block = online[names[0]].detach().cpu().numpy().astype(dtypes[names[0]])
            out.append(OnlineRotation(names, block, lin.k, lin.layer))
        return out


def _site_result(lin, w, q: grid.Quantized, fmt, seconds, transforms, errors, dtype: np.dtype) -> SiteResult:
    if errors is not None:
        ref, err, rtn_err = errors.reference, errors.error, errors.rtn_error
    else:
        ref, err = proxy.quantized_errors(w, q)
        rtn_err = err
    return SiteResult(
        name=lin.node,
        role=lin.role.value,
        layer=lin.layer,
        k=lin.k,
        n=lin.n,
        bits=fmt.bits,
        container_bits=fmt.container_bits,
        block_size=fmt.block_size,
        symmetric=fmt.symmetric,
        scale_bits=16 if dtype == np.float16 else 32,
        rel_error=err / ref if ref else 0.0,
        rtn_rel_error=rtn_err / ref if ref else 0.0,
        seconds=seconds,
        transforms=list(transforms),
        cuda_gemm_misses=fast_path.cuda_gemm_misses(fmt, lin.k, lin.n, dtype == np.float16),
    )


def _float_site(lin: Linear, seconds: float, transforms: list[str]) -> SiteResult:
    """A linear the recipe keeps in float (`exclude`): its weight's own bits, no error."""
    bits = 16 if lin.weight.dtype == "FLOAT16" else 32
    return SiteResult(
        name=lin.node, role=lin.role.value, layer=lin.layer, k=lin.k, n=lin.n, bits=bits, container_bits=bits,
        block_size=lin.k, symmetric=True, scale_bits=0, rel_error=0.0, rtn_rel_error=0.0, seconds=seconds,
        transforms=[*transforms, "excluded"],
    )  # fmt: skip


def _quantized(q: grid.Quantized, dtype: np.dtype) -> QuantizedWeight:
    return QuantizedWeight(
        codes=q.codes.cpu().numpy(),
        scales=q.scales.cpu().numpy().astype(dtype),
        zero_points=None if q.zero_points is None else q.zero_points.cpu().numpy(),
        k=q.k,
        fmt=q.fmt,
    )


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _stored_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a stored array; bfloat16, which numpy lacks, through its bits."""
    if arr.dtype == load.numpy_dtype(ir.DataType.BFLOAT16):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
