"""Plain-text tables for the terminal (strings only; the CLI decides where they go)."""

from __future__ import annotations

import re
from pathlib import Path

from ..graph.sites import ModelSites
from ..report import Report
from ..roles import ROLES


def render(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(line(r).rstrip() for r in [headers, ["-" * w for w in widths], *rows])


def structure_table(sites: ModelSites, path: Path) -> str:
    out = [f"{path}: {sites.style} export, {len(sites.layers())} layers, vocab {sites.vocab}"]
    emb = sites.embedding
    if emb:
        tie = "tied to lm_head" if emb.tied else "separate from lm_head"
        out.append(f"embedding: {emb.vocab}x{emb.hidden} ({tie}{', read through Transpose' if emb.transposed else ''})")
    if sites.lm_head:
        lm = sites.linears[sites.lm_head]
        out.append(f"lm_head: {lm.k}x{lm.n}{' (transposed weight)' if lm.weight.transposed else ''}")
    rows = []
    for att in sites.attentions:
        mlp = next((m for m in sites.mlps if m.layer == att.layer), None)
        shapes = []
        for role in ("q", "k", "v", "qkv", "o"):
            name = getattr(att, role)
            if name:
                lin = sites.linears[name]
                shapes.append(f"{role} {lin.k}x{lin.n}")
        if mlp:
            for role in ("gate_up", "down") if mlp.fused else ("gate", "up", "down"):
                lin = sites.linears[getattr(mlp, "gate" if role == "gate_up" else role)]
                shapes.append(f"{role} {lin.k}x{lin.n}")
        heads = f"{att.num_heads}/{att.num_kv_heads}x{att.head_dim}" if att.head_dim else "?"
        norms = "+".join(
            n
            for n, g in (("attn", att.input_norm), ("mlp", mlp.input_norm if mlp else None))
            if g is not None and g.exclusive
        )
        rows.append(
            [
                str(att.layer),
                att.kind,
                heads,
                att.rope + ("" if att.rotary_dim in (None, att.head_dim) else f"/{att.rotary_dim}"),
                "yes" if att.qk_norm else "no",
                norms or "-",
                ", ".join(shapes),
            ]
        )
    out.append("")
    out.append(render(["layer", "attention", "heads/kv x dim", "rope", "qk-norm", "norm gains", "linears (KxN)"], rows))
    pairs = sites.pairs()
    kinds = {k: sum(1 for p in pairs if p.kind == k) for k in ("vo", "up_down", "qk")}
    qk_ok = sum(1 for p in pairs if p.kind == "qk" and p.detail["applies"])
    out.append("")
    out.append(f"pairs: V/O {kinds['vo']}, up/down {kinds['up_down']}, Q/K {kinds['qk']} ({qk_ok} RoPE-commuting)")
    if sites.unmatched:
        out.append(f"unmatched linears (quantized without pairing or transforms, identity statistics): {len(sites.unmatched)}")
        for name, why in sites.unmatched.items():
            out.append(f"  {name}: {why}")
    for note in sites.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def result_table(report: Report) -> str:
    recipe = report.recipe
    q = recipe["quant"]
    floating = bool(recipe.get("float_output"))  # --bits 16: the transforms are written, the weights stay float
    rows = []
    for r in report.by_role():
        rows.append(
            [
                r.role,
                str(r.count),
                r.shape,
                "float" if floating else f"{r.bits_per_weight:.2f}",
                f"{100 * r.rtn_rel_error:.3f}%",
                f"{100 * r.rel_error:.3f}%",
                r.transforms,
            ]
        )
    t = report.totals()
    rows.append(
        [
            "total",
            str(t["linears"]),
            f"{t['weights'] / 1e6:.1f}M w",
            "float" if floating else f"{t['bits_per_weight']:.2f}",
            f"{100 * t['rtn_rel_error']:.3f}%",
            f"{100 * t['rel_error']:.3f}%",
            "",
        ]
    )
    grid = f"int{q['bits']} block {q['block_size']} {'symmetric' if q['symmetric'] else 'asymmetric'}"
    if floating:
        head = (
            f"{report.output}: float (--bits 16): transforms only, weights kept in float "
            f"(transforms planned for {grid}), method {recipe['method']['name']}"
        )
    else:
        head = f"{report.output}: {grid}, {recipe['output_format']}, method {recipe['method']['name']}, lm_head {recipe['lm_head']}"
    lines = [head, "", render(["role", "count", "shape", "bits/w", "rtn err", "err", "transforms"], rows, right={1, 3, 4, 5})]
    lines.append(_time_line(report))
    if floating:
        lines.append(f"rtn err, err: what round-to-nearest and the method would lose at {grid}; nothing was rounded.")
    elif q["bits"] == 3:
        lines.append("3-bit codes are stored in 4-bit containers (accuracy of 3 bits, size of 4).")
    if not floating:
        lines.append(_fast_path_line(report))
    excluded = [s.name for s in report.sites if "excluded" in s.transforms]
    if excluded:
        lines.append(f"kept in float (exclude): {len(excluded)} linear(s): {', '.join(excluded[:4])}{' ...' if len(excluded) > 4 else ''}")
    if recipe["method"]["name"] == "rtn" or recipe["method"].get("prior") == "identity":
        lines.append("err: relative proxy error ||W - W_hat||^2 / ||W||^2, mean over the role's matrices.")
    else:
        source = (
            "measured on sequences the model sampled itself (o's: propagated through the attention)"
            if recipe["method"].get("statistics") == "generated" else "propagated from the weights"
        )  # fmt: skip
        lines.append(
            f"err: relative proxy error tr(D^T H D) / tr(W^T H W) with H the input statistics {source}; "
            "v and o: their V/O product. Mean over the role's matrices; rtn err: round-to-nearest, same measure."
        )
    if report.online:
        cost = report.online_cost()
        kinds = sorted({f"{r['k']}-wide in blocks of {r['block']}" for r in report.online})
        lines.append(
            f"online rotations: {cost['rotations']} inserted ({'; '.join(kinds)}), "
            f"+{cost['macs_per_token'] / 1e6:.2f}M multiply-adds per token = "
            f"{100 * cost['fraction_of_linears']:.2f}% of the quantized linears'"
        )
    v = report.verification
    if v and v.get("verified") is False:
        lines.append(f"NOT verified ({v['why']}): the output was published without running it in ONNX Runtime")
    elif v:
        for check in v.get("checks", []):
            lines.append(
                f"{check} check passed: logits within {v[f'{check}_rel_error']:.1e} relative "
                f"(limit {v[f'{check}_limit']:.0e}) of the {'input' if check == 'exactness' else 'dequantized weights'}"
            )
        q = v.get("quality")
        if q and "kl" in q:
            lines.append(
                f"quality, data-free: on {q['samples']} sequences of {q['length']} tokens the input sampled itself, "
                f"KL(input || output) {q['kl']:.4g} per token, top-1 agreement {100 * q['top1']:.0f}%, "
                f"perplexity {q['ppl']:.3g} (input {q['input_ppl']:.3g}); a rough sign from {q['samples'] * q['length']} tokens: "
                "`dfq-onnx eval` measures more"
            )
        elif q:
            lines.append(f"quality not measured: {q['skipped']}")
        if "max_abs_error" not in v:
            lines.append(f"verified: ONNX Runtime (CPU) loads and runs the output ({v['tokens']} random ids)")
    if report.distributed:
        lines.append(_ray_line(report.distributed))
    if report.allocation:
        lines.append(_budget_line(report.allocation))
    lines.append(f"optimised and written in {report.seconds:.1f}s")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _time_line(report: Report) -> str:
    """Seconds per unit of work. A layer's linears are optimised together (pairs, transforms, GPTQ over the
    layer) and each site carries an equal share of its layer's time, so there is no time per role to show."""
    units: dict[str, float] = {}
    for s in report.sites:
        key = f"layer {s.layer}" if s.layer is not None else ("lm_head" if s.role == "lm_head" else "other linears")
        units[key] = units.get(key, 0.0) + s.seconds
    layers = {k: v for k, v in units.items() if k.startswith("layer ")}
    parts = []
    if layers:
        slowest = max(layers, key=layers.get)
        total = sum(layers.values())
        parts.append(
            f"{len(layers)} layer{'s' if len(layers) > 1 else ''} in {total:.2f}s"
            + (f" (mean {total / len(layers):.2f}s, slowest {slowest}: {layers[slowest]:.2f}s)" if len(layers) > 1 else "")
        )
    parts += [f"{k} {v:.2f}s" for k, v in units.items() if not k.startswith("layer ")]
    if not parts:
        return "time: no linears optimised"
    return f"time: {', '.join(parts)}; total {sum(units.values()):.2f}s (a layer's linears are optimised together: there is no time per role)"


def _fast_path_line(report: Report) -> str:
    """How many linears ORT's fast CUDA GEMM kernel takes, and the commonest reasons it does not."""
    hits = sum(s.cuda_fast_path for s in report.sites)
    reasons: dict[str, int] = {}
    for s in report.sites:
        for why in ["kept in float"] if "excluded" in s.transforms else s.cuda_gemm_misses:
            key = re.sub(r"^([NK])=\d+", r"\1", why)  # one count for every N (or K) that misses
            reasons[key] = reasons.get(key, 0) + 1
    line = f"CUDA fast path (MatMulNBits GEMM kernel): {hits} of {len(report.sites)} linears"
    if reasons:
        line += "; the others: " + ", ".join(f"{why} ({n})" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
    return line


def _ray_line(run: dict) -> str:
    """Where a Ray run's units were computed: per node, how many and in how many seconds."""
    per_node: dict[str, list[float]] = {}
    for unit in run["units"]:
        per_node.setdefault(f"{unit['node'][:8]} ({unit['address']})", []).append(unit["seconds"])
    nodes = ", ".join(f"{node}: {len(s)} in {sum(s):.1f}s" for node, s in sorted(per_node.items()))
    reused = f"; {run['reused_units']} taken from the unfinished run" if run["reused_units"] else ""
    return f"ray ({run['ray']}): {len(run['units'])} units on {len(per_node)} node(s), {run['threads_per_task']} thread(s) each on {run['cpus_per_task']} CPU(s): {nodes}{reused}"


def _budget_line(allocation: dict) -> str:
    counts: dict[str, int] = {}
    for site in allocation["sites"]:
        counts[site["format"]] = counts.get(site["format"], 0) + 1
    mix = ", ".join(f"{n} x {fmt}" for fmt, n in sorted(counts.items()))
    return (
        f"budget {allocation['target']}: written {allocation['written_bits_per_weight']:.3f} bits/weight, "
        f"{allocation['written_bytes'] / 2**20:.1f} MiB; formats chosen per linear ({mix}); estimated loss within "
        f"{allocation['gap']:.3g} of the optimum of the estimate (report JSON: allocation)"
    )


def allocation_table(allocation) -> str:
    """A budget's allocation (budget.Allocation): the format of every linear, layer by layer."""
    from ..run.budget import format_label

    short = lambda f: f"{f.bits}/{f.block_size}{'s' if f.symmetric else 'a'}"  # noqa: E731
    roles = [r for r in ROLES if any(s.role == r for s in allocation.sites)]
    layers = sorted({s.layer for s in allocation.sites}, key=lambda x: (x is None, x or 0))
    cell = {(s.layer, s.role): short(s.format) for s in allocation.sites}
    rows = [["head" if layer is None else str(layer)] + [cell.get((layer, r), "-") for r in roles] for layer in layers]
    sol = allocation.solution
    lines = [
        f"budget {allocation.budget.describe()} ({allocation.budget.weighting} weighting): {allocation.bits_per_weight:.3f} bits/weight "
        f"estimated; {len(allocation.sites)} linears chosen in {allocation.seconds:.1f}s",
        "",
        render(["layer", *roles], rows, right=set(range(1, len(roles) + 1))),
        "",
        "cells: bits/block, s symmetric, a asymmetric. Mix: " + ", ".join(f"{n} x {f}" for f, n in allocation.counts().items()),
        f"estimated loss {sol.loss:.4g}; no allocation within the budget estimates below {sol.bound:.4g} "
        f"(the knapsack's relaxation), so this one is within {sol.gap:.3g} of the optimum",
        "candidates: " + ", ".join(format_label(f) for f in allocation.formats)
        + (f" (none below {allocation.narrowest_bits} bits: the budget affords every linear {allocation.narrowest_bits})" if allocation.narrowest_bits > min(f.bits for f in allocation.formats) else ""),
    ]
    return "\n".join(lines)
