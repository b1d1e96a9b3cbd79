"""The one module that knows both the graph and the math: site -> weights -> method -> rewrite.

Work goes one unit (layer) at a time: read the unit's weights, optimise them, append the
results to the output's data file, rewire the graph, drop the arrays. Peak memory follows
the largest layer, not the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from . import checkpoint, memory, methods
from .mirror import Mirror
from .config import Method, OutputFormat, Prior, QuantFormat, Recipe
from .errors import DfqError, Interrupted
from .verify import VerificationFailed
from .graph import load, opset, rewrite, save
from .graph.sites import Embedding, Linear, ModelSites, Role, find_sites
from .quant import grid, proxy, stats
from .report import Report, SiteResult

ProgressFn = Callable[[str, int, int], None]  # (label of the unit just done, done, total)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    verify: str = "auto"  # "compare" logits with the input, "run" the output only, "none"; "auto": by size
    seed: int = 0
    resume: bool = False  # continue an interrupted run from its last finished layer

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise DfqError(f"seed {self.seed} is out of range: use an integer from 0 to {2**63 - 1}")
        if self.verify not in ("auto", "compare", "run", "none"):
            raise DfqError(f"unknown verify mode '{self.verify}': use auto, compare, run or none")


def default_output_path(input_path: Path, recipe: Recipe) -> Path:
    suffix = "qdq" if recipe.output_format == OutputFormat.QDQ else "q"
    return input_path.with_name(f"{input_path.stem}.{suffix}{recipe.quant.bits}.onnx")


def inspect(input_path: Path) -> ModelSites:
    return find_sites(load.load_model(input_path))


def optimize(
    input_path: Path,
    output_path: Path,
    recipe: Recipe,
    options: RunOptions = RunOptions(),
    progress: ProgressFn | None = None,
) -> Report:
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    model = load.load_model(input_path)
    check_weight_types(model)
    save.check_output_path(output_path, input_path, load.external_data_files(model))
    sites = find_sites(model)
    if load.weight_bytes(model) <= VERIFY_AUTO_LIMIT:  # larger models are checked as each weight is read
        load.check_finite(model, _float_tensors(sites))
    with save.OutputLock(output_path):
        try:
            return _optimize(model, sites, input_path, output_path, recipe, options, progress, started)
        except OSError as exc:  # the disk, not the model: one line, nothing published
            raise save.write_error(exc, output_path) from None


def _float_tensors(sites: ModelSites) -> list[str]:
    """Every initializer the method reads: linear weights, norm gains, biases, the embedding."""
    names = [lin.weight.initializer for lin in sites.linears.values()] + [b for lin in sites.linears.values() if (b := lin.bias)]
    norms = [a.input_norm for a in sites.attentions] + [a.output_norm for a in sites.attentions]
    norms += [m.input_norm for m in sites.mlps] + [m.output_norm for m in sites.mlps]
    names += [g.initializer for g in norms if g is not None]
    if sites.embedding:
        names.append(sites.embedding.initializer)
    return list(dict.fromkeys(names))


def _optimize(model, sites, input_path, output_path, recipe, options, progress, started) -> Report:
    torch.manual_seed(options.seed)
    work = save.work_dir_for(output_path)
    location = save.data_location_for(output_path)
    key = checkpoint.fingerprint(input_path, load.external_data_files(model), recipe, options.device, options.seed)
    state, notes = _start(work, key, options.resume)
    verify_mode = _verify_mode(options.verify, model, notes)  # sized on the input's weights, before rewriting
    writer = save.ExternalDataWriter(work, location, start_offset=state.data_offset)
    units = plan_units(sites, model.graph)
    resumed = state.units_done
    mirrors: dict[str, Mirror] = {}
    try:
        mirrors = _mirrors(input_path, work, recipe, verify_mode, resumed, notes)
        rewriter = _Rewriter(model, sites, recipe, writer, state, mirrors)
        head = _head_linears(sites, recipe)
        total = sum(len(u.linears) for u in units) + len(head)  # progress counts linears (sites)
        results = rewriter.replay(units[: state.units_done])
        if state.units_done:
            rewriter.residual = state.residual
            torch.set_rng_state(state.rng)
        else:
            rewriter.residual = rewriter.initial_statistics(options)
        if progress:
            progress(f"resumed after {units[state.units_done - 1].label}" if state.units_done else "start", len(results), total)
        for index, unit in enumerate(units[state.units_done :], start=state.units_done):
            results.extend(rewriter.run_unit(unit, recipe.quant, options))
            rewriter.checkpoint(work, index + 1, results)
            memory.release()  # hand the layer's freed buffers back to the OS before the next one
            if progress:
                progress(unit.label, len(results), total)
        if head:
            results.extend(rewriter.run_head(head, options))
            if progress:
                progress("lm_head/embedding", len(results), total)
        if recipe.output_format == OutputFormat.QDQ and not recipe.float_output:
            opset.raise_default_opset(model, 25 if _uses_int2(recipe) else 21)
        save.externalize_remaining(model, writer, keep_names=rewriter.written)
        writer.close()
        save.save_model(model, work / output_path.name)
        checks = {name: m.finish() for name, m in mirrors.items()}
        optimise_seconds = time.perf_counter() - started
        verification = _verify(input_path, work / output_path.name, sites, verify_mode, recipe, checks)
        for path in checks.values():  # verification only: never published
            path.unlink()
            path.with_name(path.name + ".data").unlink()
        save.publish(work, output_path, location)
    except KeyboardInterrupt:
        _close(writer, mirrors)
        if not state.units_done:  # nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise Interrupted(_interrupted_message(work, output_path, state.units_done, len(units))) from None
    except VerificationFailed:
        _close(writer, mirrors)  # the work directory stays, for inspection
        raise
    except BaseException:
        _close(writer, mirrors)
        shutil.rmtree(work, ignore_errors=True)
        raise

    report = Report.build(
        input_path=input_path,
        output_path=output_path,
        recipe=recipe,
        sites=sites,
        results=results,
        seconds=optimise_seconds,
        notes=notes + sites.notes + rewriter.notes + [f"{name} fell back to identity statistics: {why}" for name, why in sites.unmatched.items()],
    )
    report.verification = verification or {"verified": False, "why": f"--verify {verify_mode}"}
    report.online = rewriter.online_rotations()
    report.resumed_units = resumed
    report.write_json(report_path_for(output_path))
    return report


def _start(work: Path, key: str, resume: bool) -> tuple[checkpoint.State, list[str]]:
    """A fresh work directory, or the unfinished run's state when resuming it is asked for and possible."""
    notes = []
    if work.is_dir():
        state, why_not = checkpoint.load(work, key)
        if resume and state is not None:
            return state, [f"resumed an unfinished run after {state.units_done} layer(s); they were not recomputed"]
        if resume:
            notes.append(f"--resume: {why_not}; started afresh")
        elif state is not None:
            notes.append("an unfinished run of this job was discarded (pass --resume to continue one)")
        shutil.rmtree(work, ignore_errors=True)
    elif resume:
        notes.append("--resume: no unfinished run was found; started afresh")
    save.make_work_dir(work)
    return checkpoint.State(fingerprint=key), notes


def _mirrors(input_path: Path, work: Path, recipe: Recipe, verify_mode: str, resumed: int, notes: list[str]) -> dict[str, Mirror]:
    """The float copies that verification compares against (only when logits are compared)."""
    if verify_mode != "compare" or recipe.float_output:
        return {}  # a float output is itself compared with the input
    if resumed:
        notes.append("a resumed run is verified by running it and comparing its logits, not by the exactness and fidelity checks")
        return {}
    names = ["dequantized"] if recipe.method.name == Method.RTN else ["exact", "dequantized"]  # RTN transforms nothing
    return {name: Mirror(input_path, work, f".verify-{name}") for name in names}


def _close(writer: save.ExternalDataWriter, mirrors: dict[str, Mirror]) -> None:
    writer.close()
    for mirror in mirrors.values():
        mirror.close()


def _interrupted_message(work: Path, output: Path, done: int, total: int) -> str:
    if not done:
        return f"interrupted before the first layer finished; nothing was written to {output}"
    return (
        f"interrupted after {done} of {total} layers; nothing was written to {output}. "
        f"Run the same command with --resume to continue (progress is kept in {work})"
    )


VERIFY_AUTO_LIMIT = 2 << 30  # bytes of input weights up to which "auto" compares logits in ORT


def _verify_mode(requested: str, model: ir.Model, notes: list[str]) -> str:
    """"auto" compares small models; a large one is not loaded in ORT, whose memory would dwarf ours."""
    if requested != "auto":
        return requested
    size = load.weight_bytes(model)
    if size <= VERIFY_AUTO_LIMIT:
        return "compare"
    notes.append(
        f"the output was not loaded in ONNX Runtime: the input's weights are {size / 2**30:.1f} GiB and ORT would hold "
        "them in memory; pass --verify run (or compare) to check it anyway"
    )
    return "none"


def _verify(input_path: Path, candidate: Path, sites: ModelSites, mode: str, recipe: Recipe, checks: dict[str, Path]) -> dict | None:
    """Run the written model in ONNX Runtime before it is published: a model ORT rejects, or one that
    does not compute what the method decided, is never left behind."""
    if mode == "none":
        return None
    from . import verify  # ONNX Runtime is needed only here

    fp16 = any(lin.weight.dtype == "FLOAT16" for lin in sites.linears.values())
    return verify.check_output(
        input_path,
        candidate,
        sites,
        compare=mode == "compare",
        exact=checks.get("exact"),
        dequantized=checks.get("dequantized"),
        float_output=recipe.float_output and mode == "compare",
        dtype="float16" if fp16 else "float32",
        scratch=candidate.parent,
    )


def report_path_for(output_path: Path) -> Path:
    return output_path.with_name(output_path.stem + ".report.json")


def check_weight_types(model: ir.Model) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.dtype == ir.DataType.BFLOAT16 and len(tensor.shape) == 2:
            raise DfqError(
                f"weight '{value.name}' is bf16, which ONNX Runtime's CPU MatMulNBits cannot run; "
                "export the model in fp16 or fp32"
            )


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


def _only_used_by_its_norm(graph: ir.Graph, name: str) -> bool:
    """A gain initializer shared with other nodes cannot be rewritten for one of them."""
    return len(graph.initializers[name].uses()) == 1


def _head_linears(sites: ModelSites, recipe: Recipe) -> list[Linear]:
    if recipe.lm_head.bits is None or sites.lm_head is None or recipe.float_output:
        return []
    return [sites.linears[sites.lm_head]]


def _uses_int2(recipe: Recipe) -> bool:
    return recipe.quant.container_bits == 2


class _Rewriter:
    """Reads weights, runs the method, writes tensors and rewires one unit at a time."""

    def __init__(
        self,
        model: ir.Model,
        sites: ModelSites,
        recipe: Recipe,
        writer: save.ExternalDataWriter,
        state: checkpoint.State,
        mirrors: dict[str, Mirror] | None = None,
    ):
        self.model = model
        self.mirrors = mirrors or {}  # float copies for verification: "exact" and "dequantized"
        self.graph = model.graph
        self.sites = sites
        self.recipe = recipe
        self.writer = writer
        self.nodes = {node.name: node for node in self.graph}
        self.written: set[str] = set()
        self.notes: list[str] = []
        self.residual = None  # propagated residual-stream statistics (the data-free prior)
        self.state = state  # what a resumed run needs: tensors written and graph edits made, per finished layer
        self.tensors: dict[str, ir.ExternalTensor] = {}

    # -- resuming

    def replay(self, done: list[methods.Unit]) -> list[SiteResult]:
        """Redo the graph edits of finished layers from the checkpoint: their tensors are already in the data file."""
        if not done:
            return []
        for name in self.state.tensors:
            self.tensors[name] = self.state.tensor(name, self.writer.directory, self.writer.location)
        for action in self.state.actions:
            if action["op"] == "linear":
                lin = self.sites.linears[action["node"]]
                self._rewire_linear(lin, action["tensors"], QuantFormat(*action["fmt"]))
            elif action["op"] == "online":
                self._rotate(action["nodes"], action["tensor"])
            else:
                self._adopt_replacement(action["initializer"], action["tensor"])
        self.notes.extend(self.state.notes)
        return self.state.site_results()

    def checkpoint(self, work: Path, units_done: int, results: list[SiteResult]) -> None:
        """Record a finished layer, after its bytes are on disk."""
        self.writer.flush()
        self.state.units_done = units_done
        self.state.data_offset = self.writer.offset
        self.state.results = [dataclasses.asdict(r) for r in results]
        self.state.notes = list(self.notes)
        self.state.residual = self.residual
        self.state.rng = torch.get_rng_state()
        checkpoint.save(work, self.state)

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

    def activation_dtype(self, lin: Linear) -> np.dtype:
        node = self.nodes[lin.node]
        dtype = node.outputs[0].dtype or node.inputs[0].dtype
        if dtype == ir.DataType.FLOAT16:
            return np.dtype(np.float16)
        if dtype in (None, ir.DataType.FLOAT):
            return np.dtype(np.float16) if lin.weight.dtype == "FLOAT16" else np.dtype(np.float32)
        raise DfqError(f"{lin.node}: activations of type {dtype.name} are not supported; use fp32 or fp16")

    # -- units

    def run_unit(self, unit: methods.Unit, fmt: QuantFormat, options: RunOptions) -> list[SiteResult]:
        t0 = time.perf_counter()
        as_stored = self.recipe.method.name == Method.RTN  # RTN reads blocks in any layout and dtype
        weights = {lin.node: self.weight(lin, as_stored=as_stored) for lin in unit.linears}
        dtypes = {lin.node: self.activation_dtype(lin) for lin in unit.linears}
        data = methods.UnitInput(
            weights={name: w.to(options.device) for name, w in weights.items()},
            scale_dtypes={name: _torch_dtype(dt) for name, dt in dtypes.items()},
            gains={name: g.to(options.device) for name, g in self.gains(unit).items()},
            biases={lin.node: b.to(options.device) for lin in unit.linears if (b := self.bias(lin)) is not None},
            residual=self.residual,
            keep_float=self.recipe.float_output or "exact" in self.mirrors,
        )
        result = methods.method_for(self.recipe.method)(unit, data, fmt, self.recipe.method)
        self.residual = result.residual
        self.notes.extend(result.notes)
        seconds = (time.perf_counter() - t0) / max(len(unit.linears), 1)
        self._insert_online(result.online, dtypes)  # before the linears are replaced: it rewires their input
        out = []
        for lin in unit.linears:
            q = result.quantized[lin.node]
            out.append(
                self._site_result(
                    lin, weights[lin.node], q, fmt, seconds, result.transforms.get(lin.node, []), result.errors.get(lin.node)
                )
            )
            if self.recipe.float_output:
                self._emit_float(lin, result.float_weights.get(lin.node, weights[lin.node]))
            else:
                self._emit_linear(lin, q, dtypes[lin.node])
                self._mirror_weights(lin, result.float_weights.get(lin.node), q)
        for name, gain in result.changed.items():
            self._replace_gain(name, gain)
        for name, bias in result.biases.items():
            self._replace_bias(self.sites.linears[name], bias)
        return out

    def bias(self, lin: Linear) -> torch.Tensor | None:
        """The linear's output bias when it is an initializer we may rewrite (read by that Add alone)."""
        if lin.bias is None or lin.bias not in self.graph.initializers or len(self.graph.initializers[lin.bias].uses()) != 1:
            return None
        arr = load.read_array(self.graph.initializers[lin.bias].const_value).astype(np.float32).reshape(-1)
        return torch.from_numpy(arr)

    def _replace_bias(self, lin: Linear, bias: torch.Tensor) -> None:
        old = self.graph.initializers[lin.bias].const_value
        arr = bias.detach().cpu().numpy().astype(load.numpy_dtype(old.dtype)).reshape(tuple(old.shape.numpy()))
        self._replace_with(lin.bias, arr, old.dtype)

    def _mirror_weights(self, lin: Linear, float_weight: torch.Tensor | None, q: grid.Quantized) -> None:
        """The verification copies get the float weight that was rounded, and what the written bytes mean."""
        if "exact" in self.mirrors and float_weight is not None:
            self.mirrors["exact"].set_weight(lin, float_weight.detach().cpu().numpy())
        if "dequantized" in self.mirrors:
            self.mirrors["dequantized"].set_weight(lin, q.dequantize().cpu().numpy())

    def initial_statistics(self, options: RunOptions):
        """Residual-stream statistics at the first layer, from the embedding table (for the propagated prior)."""
        method = self.recipe.method
        emb = self.sites.embedding
        if method.name != Method.CAFEQ or method.prior != Prior.PROPAGATED or emb is None:
            return None
        tensor = self.graph.initializers[emb.initializer].const_value
        rows = load.iter_rows(tensor, emb.transposed, rows_per_block=1024)
        return stats.embedding_moments(rows, self.sites.embedding_scale, emb.vocab, options.device)

    def gains(self, unit: methods.Unit) -> dict[str, torch.Tensor]:
        """Multiplicative norm gains in front of the unit's linears (1 + w where the graph adds the 1)."""
        out = {}
        norms = []
        if unit.attention:
            norms += [unit.attention.input_norm, unit.attention.output_norm]
        if unit.mlp:
            norms += [unit.mlp.input_norm, unit.mlp.output_norm]
        for norm in norms:
            if norm is None:
                continue
            arr = load.read_array(self.graph.initializers[norm.initializer].const_value).astype(np.float32).reshape(-1)
            out[norm.initializer] = torch.from_numpy(arr + 1.0 if norm.plus_one else arr)
        return out

    def run_head(self, head: list[Linear], options: RunOptions) -> list[SiteResult]:
        fmt = QuantFormat(self.recipe.lm_head.bits, self.recipe.quant.block_size, self.recipe.quant.symmetric)
        out = []
        for lin in head:
            t0 = time.perf_counter()
            w = self.weight(lin)
            dtype = self.activation_dtype(lin)
            q = grid.rtn(w.to(options.device), fmt, _torch_dtype(dtype))
            out.append(self._site_result(lin, w, q, fmt, time.perf_counter() - t0, []))
            written = self._emit_linear(lin, q, dtype)
            self._mirror_weights(lin, None, q)
            emb = self.sites.embedding
            if emb is not None:
                self._emit_embedding(emb, lin, q, written, fmt, dtype, options)
        return out

    # -- online rotations

    def _insert_online(self, online: dict[str, torch.Tensor], dtypes: dict[str, np.dtype]) -> None:
        """One inserted rotation per activation, shared by the linears of the unit that read it."""
        groups: dict[int, list[str]] = {}
        for name in online:
            groups.setdefault(id(self.nodes[name].inputs[0]), []).append(name)
        for names in groups.values():
            block = online[names[0]].detach().cpu().numpy().astype(dtypes[names[0]])
            tensor = self._rotation_tensor(block)
            lin = self.sites.linears[names[0]]
            self.state.actions.append(
                {"op": "online", "nodes": names, "tensor": tensor, "k": lin.k, "block": block.shape[0], "layer": lin.layer}
            )
            self._rotate(names, tensor)
            for mirror in self.mirrors.values():
                mirror.rotate(names, block)

    def _rotation_tensor(self, block: np.ndarray) -> str:
        """The b x b block as a tensor of the data file, written once and shared by every layer using it."""
        digest = hashlib.sha1(block.tobytes()).hexdigest()[:8]
        name = f"online_rotation{block.shape[0]}_{block.dtype.name}_{digest}"
        if name not in self.tensors:
            self._store(name, block, rewrite._ir_dtype(block.dtype), block.shape)
        return name

    def _rotate(self, names: list[str], tensor: str) -> None:
        value = self.graph.initializers[tensor] if tensor in self.graph.initializers else self._adopt(tensor)
        rewrite.insert_block_rotation(self.graph, [self.nodes[n] for n in names], value)

    def online_rotations(self) -> list[dict]:
        return [{k: v for k, v in a.items() if k != "op"} for a in self.state.actions if a["op"] == "online"]

    # -- results

    def _site_result(self, lin, w, q: grid.Quantized, fmt, seconds, transforms, errors=None) -> SiteResult:
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
            scale_bits=16 if self.activation_dtype(lin) == np.float16 else 32,
            rel_error=err / ref if ref else 0.0,
            rtn_rel_error=rtn_err / ref if ref else 0.0,
            seconds=seconds,
            transforms=list(transforms),
        )

    # -- writing

    def _write(self, name: str, array: np.ndarray, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
        return self._adopt(self._store(name, array, dtype, shape))

    def _store(self, name: str, array: np.ndarray, dtype: ir.DataType, shape: tuple[int, ...]) -> str:
        """Append a tensor to the data file and remember where it is (for the graph and the checkpoint)."""
        tensor = self.writer.write(name, array, dtype, shape)
        self.tensors[name] = tensor
        checkpoint.record_tensor(self.state, tensor)
        return name

    def _adopt(self, name: str) -> ir.Value:
        value = rewrite.new_initializer(self.graph, name, self.tensors[name])
        self.written.add(value.name)
        return value

    def _adopt_replacement(self, initializer: str, name: str) -> None:
        rewrite.replace_initializer(self.graph, initializer, self.tensors[name])
        self.written.add(initializer)

    def _replace_with(self, initializer: str, array: np.ndarray, dtype: ir.DataType) -> None:
        for mirror in self.mirrors.values():
            mirror.replace(initializer, array)
        self._store(initializer, array, dtype, array.shape)
        self.state.actions.append({"op": "replace", "initializer": initializer, "tensor": initializer})
        self._adopt_replacement(initializer, initializer)

    def _packed(self, q: grid.Quantized, dtype: np.dtype, lin: Linear) -> rewrite.PackedWeight:
        return rewrite.PackedWeight(
            fmt=q.fmt,
            k=lin.k,
            n=lin.n,
            codes=q.codes.cpu().numpy(),
            scales=q.scales.cpu().numpy().astype(dtype),
            zero_points=None if q.zero_points is None else q.zero_points.cpu().numpy(),
        )

    def _emit_linear(self, lin: Linear, q: grid.Quantized, dtype: np.dtype) -> dict[str, ir.Value]:
        packed = self._packed(q, dtype, lin)
        base = lin.weight.initializer
        if self.recipe.output_format == OutputFormat.MATMULNBITS:
            tensors = {key: (arr, irtype, arr.shape) for key, (arr, irtype) in packed.matmulnbits_tensors().items()}
            tag = "Q"
        else:
            tensors = packed.qdq_tensors()
            tag = "DQ"
        names = {key: self._store(f"{base}_{tag}{q.fmt.bits}_{key}", *spec) for key, spec in tensors.items()}
        fmt = [q.fmt.bits, q.fmt.block_size, q.fmt.symmetric]
        self.state.actions.append({"op": "linear", "node": lin.node, "tensors": names, "fmt": fmt})
        return self._rewire_linear(lin, names, q.fmt)

    def _rewire_linear(self, lin: Linear, names: dict[str, str], fmt: QuantFormat) -> dict[str, ir.Value]:
        values = {key: self._adopt(name) for key, name in names.items()}
        node = self.nodes.pop(lin.node)
        if self.recipe.output_format == OutputFormat.MATMULNBITS:
            new = rewrite.to_matmulnbits(self.graph, node, lin, values, fmt, self.recipe.accuracy_level)
        else:
            new = rewrite.to_qdq(self.graph, node, lin, values, fmt)
        self.nodes[new.name] = new
        return values

    def _emit_embedding(self, emb: Embedding, lin: Linear, q_head: grid.Quantized, head_values, fmt, dtype, options):
        if lin.k % fmt.block_size:
            self.notes.append(
                f"embedding kept in float: hidden size {lin.k} is not a multiple of the block size {fmt.block_size}"
            )
            if emb.tied and "dequantized" in self.mirrors:  # its copy shares the lm_head's now-dequantized table
                self.mirrors.pop("dequantized").close()
                self.notes.append("fidelity not checked: the tied embedding stays float while its lm_head is quantized")
            return
        if emb.tied:
            q = q_head
        else:
            arr = load.read_array(self.graph.initializers[emb.initializer].const_value)
            e = torch.from_numpy(arr.astype(np.float32, copy=False))
            w = e if emb.transposed else e.t().contiguous()
            q = grid.rtn(w.to(options.device), fmt, _torch_dtype(dtype))
            if "dequantized" in self.mirrors:
                table = q.dequantize().cpu().numpy()  # [hidden, vocab]
                self.mirrors["dequantized"].replace(emb.initializer, table if emb.transposed else table.T)
        packed = self._packed(q, dtype, lin)
        gather = self.nodes.pop(emb.node)
        base = f"{emb.initializer}_embedding"
        nbits = self.recipe.output_format == OutputFormat.MATMULNBITS
        shared = head_values if (emb.tied and nbits) else None  # reuse the lm_head's B bytes and scales
        data = self._embedding_data(packed, shared, base)
        scales = shared["scales"] if shared else self._write(
            f"{base}_scales", packed.scales, rewrite._ir_dtype(packed.scales.dtype), packed.scales.shape
        )
        zps = None
        if nbits:
            if packed.zero_points is not None:
                zp = rewrite.pack.matmulnbits_zero_points(packed.zero_points, fmt.container_bits)
                zps = shared["zero_points"] if shared else self._write(f"{base}_zp", zp, ir.DataType.UINT8, zp.shape)
            new = rewrite.gather_block_quantized(self.graph, gather, data, scales, zps, fmt)
        else:
            if packed.zero_points is not None:
                zps = self._write(f"{base}_zp", packed.zero_points, ir.DataType.UINT8, packed.zero_points.shape)
            irtype = rewrite._ir_dtype(packed.scales.dtype)
            new = rewrite.gather_unpacked(self.graph, gather, data, scales, zps, fmt, lin.k, irtype)
            if emb.tied:
                self.notes.append("QDQ output stores the tied embedding and lm_head as two quantized copies")
        self.nodes[new.name] = new

    def _embedding_data(self, packed: rewrite.PackedWeight, shared, base) -> ir.Value:
        """Rows of the embedding packed along hidden: the very bytes of MatMulNBits' B when tied."""
        shape = (packed.n, packed.k * packed.fmt.container_bits // 8)
        if shared:
            src = shared["B"].const_value
            tensor = ir.ExternalTensor(
                src.location, src.offset, src.length, ir.DataType.UINT8, shape=ir.Shape(shape), name=base, base_dir=src.base_dir
            )
            value = rewrite.new_initializer(self.graph, f"{base}_data", tensor)
            self.written.add(value.name)
            return value
        arr = rewrite.pack.matmulnbits_b(packed.codes, packed.fmt.container_bits).reshape(shape)
        return self._write(f"{base}_data", arr, ir.DataType.UINT8, shape)

    def _emit_float(self, lin: Linear, w: torch.Tensor) -> None:
        """Float output: the (transformed) weight goes back into its own initializer, in its layout."""
        name = lin.weight.initializer
        old = self.graph.initializers[name].const_value
        arr = w.detach().cpu().numpy()
        arr = arr.T if lin.weight.transposed else arr
        arr = np.ascontiguousarray(arr.astype(load.numpy_dtype(old.dtype)))
        self._replace_with(name, arr, old.dtype)

    def _replace_gain(self, name: str, gain: torch.Tensor) -> None:
        """Write a folded norm gain back in the graph's own form (stored w where the graph adds 1)."""
        plus_one = any(
            g is not None and g.initializer == name and g.plus_one
            for g in [a.input_norm for a in self.sites.attentions] + [m.input_norm for m in self.sites.mlps]
        )
        old = self.graph.initializers[name].const_value
        values = gain.detach().cpu().numpy().astype(np.float64)
        if plus_one:
            values = values - 1.0
        arr = values.astype(load.numpy_dtype(old.dtype)).reshape(tuple(old.shape.numpy()))
        self._replace_with(name, arr, old.dtype)


def _stored_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch view of a stored array; bfloat16, which numpy lacks, through its bits."""
    if arr.dtype == load.numpy_dtype(ir.DataType.BFLOAT16):
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
