"""Mixed precision under a size budget (--target-bits / --target-size) on a tiny Gemma 2 from the
exporter's default dynamo export: the written model's bits are the report's, within the budget,
and every node carries the format the report says."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import file_digests

import dfq_onnx
from dfq_onnx.run import budget
from dfq_onnx.front import cli
from dfq_onnx.config import QuantFormat

FORMATS = "2:32:asym,4:32:asym,4:32:sym,8:32:sym"  # every tiny K (128, 352) is a multiple of 32


def _written_bits(path) -> tuple[dict[str, dict], float, float]:
    """Per MatMulNBits node: bits, block, symmetric and the bits its codes, scales and zero points
    take in the file; with the padding bound of the packed zero points (bits/column rounded up to bytes)."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, total, padding = {}, 0.0, 0.0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        arrays = [onnx.numpy_helper.to_array(inits[name], base_dir=str(path.parent)) for name in node.input[1:4] if name and name in inits]
        codes, scales = arrays[0], arrays[1]
        zero_points = arrays[2] if len(arrays) > 2 else None
        bits = codes.nbytes * 8 + scales.size * scales.dtype.itemsize * 8 + (0 if zero_points is None else zero_points.nbytes * 8)
        blocks = -(-attrs["K"] // attrs["block_size"])
        if zero_points is not None:  # packed per column: the last byte may hold fewer zero points than it could
            padding += attrs["N"] * ((8 - blocks * attrs["bits"] % 8) % 8)
        nodes[node.name] = {"bits": attrs["bits"], "block_size": attrs["block_size"], "symmetric": zero_points is None, "stored": bits}
        total += bits
    return nodes, total, padding


def test_target_bits_is_met_by_the_written_model(tiny, tmp_path):
    src = tiny("dynamo")
    before = file_digests(src)
    out = tmp_path / "mixed.onnx"
    report = dfq_onnx.quantize(src, out, recipe="cafeq-int4", target_bits=4.5, target_formats=FORMATS, verify="compare")
    assert file_digests(src) == before
    nodes, written, padding = _written_bits(out)
    sites = {s.name: s for s in report.sites}
    # Each node has the format the report gives its site, and the allocation chose it.
    chosen = {s["name"]: s["format"] for s in report.allocation["sites"]}
    for name, site in sites.items():
        node = nodes[f"{name}_Q{site.bits}"]  # the MatMulNBits node that replaced the site's MatMul
        assert (node["bits"], node["block_size"], node["symmetric"]) == (site.bits, site.block_size, site.symmetric)
        assert chosen[name] == budget.format_label(QuantFormat(site.bits, site.block_size, site.symmetric))
    # The written bits are the report's (up to the derived padding of packed zero points), within the budget.
    reported = sum(s.bits_per_weight * s.weights for s in sites.values())
    assert reported - padding <= written <= reported + padding
    weights = sum(s.weights for s in sites.values())
    assert report.totals()["bits_per_weight"] <= 4.5 + 1e-9
    assert written / weights <= 4.5 + padding / weights
    assert report.allocation["written_bits_per_weight"] == pytest.approx(report.totals()["bits_per_weight"])
    # A budget between the formats mixes them.
    assert len({chosen[name] for name in chosen}) >= 2
    assert report.verification["verified"]


def test_budget_allocation_beats_the_uniform_format_of_the_same_size_in_its_estimate(tiny):
    """The solver's own promise on a real graph: at the cost of uniform int4 g32 asym, no worse
    estimated loss than that uniform choice (which is one of the allocations it considered)."""
    from dfq_onnx.config import load_recipe
    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    model = load.load_model(tiny("dynamo"))
    sites = find_sites(model)
    recipe = load_recipe("cafeq-int4")
    uniform = QuantFormat(4, 32, False)
    weights = sum(lin.k * lin.n for lin in sites.linears.values() if lin.node != sites.lm_head)
    cost = sum(budget.stored_bits(uniform, lin.k, lin.n, 32) for lin in sites.linears.values() if lin.node != sites.lm_head)
    found = budget.choose_formats(model, sites, recipe, budget.Budget(bits=cost / weights, formats=budget.parse_formats(FORMATS)))
    uniform_loss = sum(found.estimates[site.name][budget.format_label(uniform)] for site in found.sites)
    assert found.solution.cost <= cost + 1e-6
    assert found.solution.loss <= uniform_loss * (1 + 1e-9)
    assert found.solution.bound <= found.solution.loss


def test_target_size_and_inspect_plan(tiny, tmp_path, capsys):
    src = tiny("dynamo")
    size = sum(p.stat().st_size for p in src.parent.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    target = int(size * 0.45)
    assert cli.main(["inspect", str(src), "--plan", "--target-size", str(target), "--recipe", "cafeq-int4", "--target-formats", FORMATS]) == 0
    printed = capsys.readouterr().out
    assert "bits/weight estimated" in printed and "layer" in printed
    assert not any(p.suffix == ".onnx" for p in tmp_path.iterdir())
    out = tmp_path / "sized.onnx"
    report = dfq_onnx.quantize(src, out, recipe="cafeq-int4", target_size=target, target_formats=FORMATS, verify="run")
    written = out.stat().st_size + (out.parent / (out.name + ".data")).stat().st_size
    assert written == report.allocation["written_bytes"]
    assert written <= target


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-bits", "1.2"], "below the smallest mix"),
        (["--target-bits", "4", "--target-size", "1MB"], "give one budget"),
        (["--target-bits", "4", "--target-formats", "4:100:asym"], "block-size"),
        (["--target-bits", "4", "--target-formats", "4-32"], "bits:block:sym"),
        (["--target-size", "lots"], "--target-size"),
        (["--target-formats", "4:32:sym"], "needs a budget"),
    ],
)
def test_bad_budgets_are_one_line_errors(tiny, tmp_path, capsys, args, message):
    out = tmp_path / "x.onnx"
    code = cli.main(["optimize", str(tiny("dynamo")), "-o", str(out), "--quiet", "--recipe", "cafeq-int4", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and not any(tmp_path.iterdir())


def test_parse_size():
    assert budget.parse_size("1.5GB") == 1_500_000_000
    assert budget.parse_size("800MiB") == 800 * 2**20
    assert budget.parse_size("12345") == 12345


def test_report_json_has_the_allocation(tiny, tmp_path):
    out = tmp_path / "m.onnx"
    dfq_onnx.quantize(tiny("dynamo"), out, recipe="cafeq-int4", target_bits=3.5, target_formats=FORMATS, verify="none", fast=True)
    data = json.loads((tmp_path / "m.report.json").read_text())
    alloc = data["allocation"]
    assert alloc["target"] == "3.5 bits/weight"
    assert alloc["written_bits_per_weight"] <= 3.5 + 1e-9
    assert np.isclose(alloc["estimated_bits_per_weight"], alloc["written_bits_per_weight"])
    assert {s["name"] for s in alloc["sites"]} == {s["name"] for s in data["sites"]}


def test_default_recipe_mixes_only_cuda_fast_path_layouts(tiny):
    """The default recipe is the CUDA fast-path layout, so its budget keeps every linear on a layout
    that kernel runs; another recipe gets every 2/4/8-bit layout."""
    from dfq_onnx import fast_path
    from dfq_onnx.config import DEFAULT_RECIPE, load_recipe
    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    from dfq_onnx.quant import sensitivity

    cuda = budget.default_formats(load_recipe(DEFAULT_RECIPE))
    assert set(cuda) == {QuantFormat(2, 64, True), QuantFormat(4, 32, True), QuantFormat(8, 32, True)}
    assert len(budget.default_formats(load_recipe("cafeq-int4"))) == 18
    model = load.load_model(tiny("dynamo"))
    sites = find_sites(model)
    found = budget.choose_formats(model, sites, load_recipe(DEFAULT_RECIPE), budget.Budget(bits=6.0))
    assert {s.format for s in found.sites} <= set(cuda)
    assert all(not fast_path.cuda_gemm_misses(s.format, s.format.block_size, 64, True) for s in found.sites)
    relative = budget.choose_formats(model, sites, load_recipe(DEFAULT_RECIPE), budget.Budget(bits=6.0, weighting="relative"))
    shares = {s.name: s.share for s in found.sites}
    assert all(0 < v < 1 for v in shares.values())  # the propagated residual: each sublayer writes part of it
    residual = budget.choose_formats(model, sites, load_recipe(DEFAULT_RECIPE), budget.Budget(bits=6.0, weighting="residual"))
    for s in relative.sites:  # the default (relative) weighs by the role's factor where residual weighs by the share
        factor = sensitivity.ROLE_SENSITIVITY[s.role]
        for label, loss in relative.estimates[s.name].items():
            assert loss / factor * shares[s.name] == pytest.approx(residual.estimates[s.name][label], rel=1e-9)
            assert loss == found.estimates[s.name][label]


def test_lm_head_takes_part_when_its_policy_quantizes_it(tiny, tmp_path):
    """With --lm-head int8 the head is one more site of the budget (4 or 8 bits); with keep it is not."""
    out = tmp_path / "head.onnx"
    report = dfq_onnx.quantize(tiny("dynamo"), out, recipe="cafeq-int4", lm_head="int8", target_bits=4.0, target_formats=FORMATS,
                               verify="none", fast=True)  # fmt: skip
    head = next(s for s in report.sites if s.role == "lm_head")
    chosen = {s["name"]: s for s in report.allocation["sites"]}
    assert chosen[head.name]["format"] == budget.format_label(QuantFormat(head.bits, head.block_size, head.symmetric))
    assert head.bits in (4, 8)
    nodes, written, padding = _written_bits(out)
    assert sum(s.bits_per_weight * s.weights for s in report.sites) == pytest.approx(written, abs=padding + 1e-6)
    assert report.totals()["bits_per_weight"] <= 4.0 + 1e-9
    kept = dfq_onnx.quantize(tiny("dynamo"), tmp_path / "kept.onnx", recipe="cafeq-int4", target_bits=4.0, target_formats=FORMATS,
                             verify="none", fast=True)  # fmt: skip
    assert all(s["role"] != "lm_head" for s in kept.allocation["sites"])


def test_estimate_leaves_out_the_mean_direction():
    """Round-to-nearest's errors cancel along one direction, so a large input mean would make a site look
    nearly free: the estimate's relative error is the same with the mean direction removed, and the
    mean-kept error differs (a site whose energy is mostly along its mean)."""
    import torch

    from dfq_onnx.quant import rounding, sensitivity

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 64, generator=gen)
    diag = torch.rand(256, generator=gen) + 0.5
    mean = torch.full((256,), 8.0)  # the mean term carries most of tr(W^T H W)
    fmts = [QuantFormat(2, 64, True), QuantFormat(4, 128, False)]
    site = sensitivity.SiteStatistics(w, rounding.LowRank(diag, mean), torch.float32, 0.5)
    bare = sensitivity.SiteStatistics(w, rounding.LowRank(diag, torch.zeros(256)), torch.float32, 0.5)
    centred = sensitivity.relative_errors(site, fmts)
    assert centred == pytest.approx(sensitivity.relative_errors(bare, fmts), rel=1e-6)
    kept = sensitivity.relative_errors(site, fmts, centred=False)
    assert all(abs(k - c) > 0.1 * c for k, c in zip(kept, centred))


def test_a_budget_that_affords_every_site_4_bits_sends_none_to_2(tiny):
    """Above the cost of the cheapest 4-bit format everywhere, no linear drops to 2 bits to buy 8 bits
    elsewhere (the estimate misjudges 2-bit sites most; measured in BENCHMARKS.md); below it, 2-bit
    candidates take part."""
    from dfq_onnx.config import load_recipe
    from dfq_onnx.graph import load
    from dfq_onnx.graph.sites import find_sites

    model = load.load_model(tiny("dynamo"))
    sites = find_sites(model)
    recipe = load_recipe("cafeq-int4")
    formats = budget.parse_formats(FORMATS)
    for bits in (6.0, 7.0):
        found = budget.choose_formats(model, sites, recipe, budget.Budget(bits=bits, formats=formats))
        assert min(s.format.bits for s in found.sites) == 4 and max(s.format.bits for s in found.sites) == 8
        assert all("int2" not in label for est in found.estimates.values() for label in est)
        assert found.narrowest_bits == 4 and found.to_dict()["narrowest_bits"] == 4
    low = budget.choose_formats(model, sites, recipe, budget.Budget(bits=4.0, formats=formats))
    assert min(s.format.bits for s in low.sites) == 2 and low.narrowest_bits == 2


def test_head_estimate_reads_only_pieces_of_the_head(tiny, monkeypatch):
    """The estimate rounds 128 evenly spaced columns of the lm_head: they are gathered from pieces read
    one at a time (several pieces here), equal to the same columns of the whole weight."""
    import torch

    from dfq_onnx import methods
    from dfq_onnx.graph.load import load_model
    from dfq_onnx.graph.sites import find_sites
    from dfq_onnx.quant import sensitivity
    from dfq_onnx.run.weights import WeightReader

    model = load_model(tiny("dynamo"))
    sites = find_sites(model)
    reader = WeightReader(model.graph, sites, "cpu")
    head = sites.linears[sites.lm_head]
    assert head.n > sensitivity.ESTIMATE_COLUMNS  # the sample is a proper subset
    monkeypatch.setattr(methods, "HEAD_CHUNK", 37)
    sample = budget._head_sample(reader, head)
    assert torch.equal(sample, reader.weight(head)[:, sensitivity.estimate_columns(head.n)])
