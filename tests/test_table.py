"""The summary table printed after `optimize` (dfq_onnx/front/table.py), built from hand-made reports."""

from __future__ import annotations

import re

import pytest

from dfq_onnx.report import Report, SiteResult
from dfq_onnx.front.table import result_table

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_SECONDS = {0: 78.68, 1: 2.5, 2: 3.25}  # the first layer pays for compiling the kernels
HEAD_SECONDS = 4.0


def site(role: str, layer: int | None, seconds: float, k: int = 128, n: int = 128) -> SiteResult:
    return SiteResult(
        name=f"{role}.{layer}", role=role, layer=layer, k=k, n=n, bits=4, container_bits=4, block_size=32,
        symmetric=True, scale_bits=32, rel_error=0.006, rtn_rel_error=0.008, seconds=seconds, transforms=["gptq"],
    )  # fmt: skip


def report(float_output: bool = False) -> Report:
    """Sites as the planner records them: each linear of a unit carries an equal share of the unit's time."""
    sites = [site(role, layer, t / len(ROLES)) for layer, t in LAYER_SECONDS.items() for role in ROLES]
    if not float_output:  # --bits 16 leaves the head alone
        sites.append(site("lm_head", None, HEAD_SECONDS, n=500))
    recipe = {
        "quant": {"bits": 4, "block_size": 32, "symmetric": True},
        "output_format": "matmulnbits",
        "method": {"name": "cafeq"},
        "lm_head": "int8",
        "float_output": float_output,
    }
    return Report(input="in.onnx", output="out.onnx", recipe=recipe, structure={}, sites=sites, seconds=95.0, notes=[])


def seconds_in(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+\.\d+)s\b", line)]


def test_time_once_per_layer_and_a_true_total():
    text = result_table(report())
    header = text.splitlines()[2]
    assert "sec" not in header.split()  # a role's share of its layers' time is not a measurement
    rows = {line.split()[0]: line for line in text.splitlines()[4:] if line.split() and line.split()[0] in (*ROLES, "lm_head", "total")}
    assert set(rows) == {*ROLES, "lm_head", "total"}
    for role in ROLES:
        assert f"{LAYER_SECONDS[0] / len(ROLES):.2f}" not in rows[role]
    (time_line,) = [line for line in text.splitlines() if line.startswith("time:")]
    real = sum(LAYER_SECONDS.values()) + HEAD_SECONDS
    assert time_line.endswith("(a layer's linears are optimised together: there is no time per role)")
    total = float(re.search(r"total (\d+\.\d+)s", time_line).group(1))
    assert total == pytest.approx(real, abs=0.005)
    assert f"3 layers in {sum(LAYER_SECONDS.values()):.2f}s" in time_line
    assert f"slowest layer 0: {LAYER_SECONDS[0]:.2f}s" in time_line
    assert f"lm_head {HEAD_SECONDS:.2f}s" in time_line
    # every number on the line is a layer sum, their mean, the head or the total: no per-role repeats
    assert len(seconds_in(time_line)) == 5


def test_quantized_header_names_the_grid():
    text = result_table(report())
    assert text.splitlines()[0] == "out.onnx: int4 block 32 symmetric, matmulnbits, method cafeq, lm_head int8"
    assert "CUDA fast path" in text


def test_bits_16_says_float():
    text = result_table(report(float_output=True))
    head = text.splitlines()[0]
    assert head.startswith("out.onnx: float (--bits 16): transforms only, weights kept in float")
    assert "matmulnbits" not in head and "lm_head" not in head
    assert not head.split(": ", 1)[1].startswith("int")
    rows = {line.split()[0]: line.split() for line in text.splitlines()[4:] if line.split() and line.split()[0] in (*ROLES, "total")}
    assert all(rows[role][3] == "float" for role in ROLES) and rows["total"][4] == "float"  # bits/w ("total  22  0.0M w")
    assert "CUDA fast path" not in text  # no MatMulNBits was written
    assert "nothing was rounded" in text
