"""Bad input: one clear line on stderr, a non-zero exit, the input's bytes unchanged, nothing half-written."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from conftest import file_digests
from dfq_onnx.front.cli import main


def copy_model(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in src.parent.iterdir():
        if p.is_file():
            shutil.copy(p, dst_dir / p.name)
    return dst_dir / src.name


def expect_error(capsys, args: list[str], *needles: str) -> str:
    capsys.readouterr()  # drop whatever fixtures printed while building models
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dfq-onnx: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_untouched(before: dict, model: Path, out_dir: Path, produced: set[str] = frozenset()):
    assert file_digests(model) == before
    leftovers = {p.name for p in out_dir.iterdir()} - set(before) - set(produced)
    assert not leftovers, leftovers


def test_not_an_onnx_file(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    before = file_digests(bad)
    expect_error(capsys, ["optimize", str(bad), "-o", str(tmp_path / "o.onnx")], "not a readable ONNX model")
    assert_untouched(before, bad, tmp_path)


def test_missing_file(tmp_path, capsys):
    expect_error(capsys, ["optimize", str(tmp_path / "nope.onnx")], "no such file")


def test_missing_external_data(tiny, tmp_path, capsys):
    model = tmp_path / "model.onnx"
    shutil.copy(tiny("dynamo"), model)  # the .onnx without its .data
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(tmp_path / "o.onnx")], "model.onnx.data", "missing")
    assert_untouched(before, model, tmp_path)


def test_no_weight_matmuls(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), model)
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(tmp_path / "o.onnx")], "no weight MatMuls")
    assert_untouched(before, model, tmp_path)


def test_already_quantized(tiny, tmp_path, capsys):
    q4 = tmp_path / "q4.onnx"
    assert main(["optimize", str(tiny("dynamo")), "-o", str(q4), "--quiet", "--verify", "none"]) == 0
    before = file_digests(q4)
    expect_error(capsys, ["optimize", str(q4), "-o", str(tmp_path / "again.onnx")], "already quantized", "MatMulNBits")
    assert_untouched(before, q4, tmp_path)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--bits", "5"], "--bits 5"),
        (["--bits", "6"], "--bits 6"),
        (["--block-size", "48"], "--block-size 48"),
        (["--block-size", "512"], "--block-size 512"),
        (["--block-size", "8"], "--block-size 8"),
        (["--accuracy-level", "7"], "accuracy level 7"),
        (["--recipe", "no-such-recipe"], "recipe 'no-such-recipe' not found"),
        (["--online", "up"], "unknown online site(s) ['up']"),
    ],
)
def test_unsupported_settings(tiny, tmp_path, capsys, flags, needle):
    model = copy_model(tiny("dynamo"), tmp_path / "m")
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(tmp_path / "m" / "o.onnx"), *flags], needle)
    assert_untouched(before, model, model.parent)


def test_bf16_weights(tiny, tmp_path, capsys):
    m = ir.load(tiny("dynamo"))
    for value in m.graph.initializers.values():
        t = value.const_value
        if t is not None and t.dtype == ir.DataType.FLOAT and len(t.shape) == 2:
            import ml_dtypes

            value.const_value = ir.Tensor(t.numpy().astype(ml_dtypes.bfloat16), name=value.name)
    model = tmp_path / "bf16.onnx"
    ir.save(m, model, external_data="bf16.onnx.data")
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(tmp_path / "o.onnx")], "bf16", "fp16 or fp32")
    assert_untouched(before, model, tmp_path)


def test_output_is_input(tiny, tmp_path, capsys):
    model = copy_model(tiny("dynamo"), tmp_path / "m")
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(model)], "is the input model")
    assert_untouched(before, model, model.parent)


def test_output_would_overwrite_input_data(tiny, tmp_path, capsys):
    m = ir.load(tiny("dynamo"))
    model = tmp_path / "m.onnx"
    ir.save(m, model, external_data="x.onnx.data")  # the data of m.onnx is named like x.onnx's
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(tmp_path / "x.onnx")], "overwrite the input's external data")
    assert_untouched(before, model, tmp_path)


def test_truncated_external_data(tiny, tmp_path, capsys):
    model = copy_model(tiny("dynamo"), tmp_path / "m")
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    before = file_digests(model)
    expect_error(capsys, ["optimize", str(model), "-o", str(tmp_path / "m" / "o.onnx")], "truncated")
    assert_untouched(before, model, model.parent)


def test_failed_run_leaves_no_output(tiny, tmp_path, capsys, monkeypatch):
    """A crash mid-way (here: inside the method) removes the work directory; no model appears."""
    from dfq_onnx import methods

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    real = methods.method_for
    monkeypatch.setattr(methods, "method_for", lambda config: dataclasses.replace(real(config), quantize=broken))
    model = copy_model(tiny("dynamo"), tmp_path / "m")
    before = file_digests(model)
    with pytest.raises(RuntimeError):
        main(["optimize", str(model), "-o", str(model.parent / "o.onnx"), "--quiet"])
    assert_untouched(before, model, model.parent)


def test_existing_output_replaced_atomically(tiny, tmp_path):
    """An existing output keeps its old bytes while the run works (it is never opened in place), then the
    finished model takes its place whole: its data beside it, no work files left behind."""
    from dfq_onnx.config import Recipe
    from dfq_onnx.run.pipeline import RunOptions, optimize

    model = tiny("dynamo")
    out = tmp_path / "q.onnx"
    out.write_text("old")
    seen = []  # the output's bytes each time a layer (and the head) is done
    optimize(model, out, Recipe(), RunOptions(verify="none"), progress=lambda *_: seen.append(out.read_bytes()))
    assert len(seen) >= 2 and all(b == b"old" for b in seen), seen
    m = onnx.load(out)  # a real model replaced the old file, with every external tensor's bytes in place
    assert any(n.op_type == "MatMulNBits" for n in m.graph.node)
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer for e in t.external_data if e.key == "location"}
    assert locations and all((tmp_path / loc).is_file() for loc in locations), locations
    assert {p.name for p in tmp_path.iterdir()} == {out.name, "q.report.json", *locations}  # no work directory left
