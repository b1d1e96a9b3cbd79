"""The Python API: the README's example runs as written, the CLI is a thin layer over it (same
bytes), and a caller gets the CLI's checks and signal behaviour."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest

import dfq_onnx
from dfq_onnx.front.cli import main
from dfq_onnx.config import load_recipe

README = Path(__file__).resolve().parent.parent / "README.md"


def lone_model(tiny, directory: Path) -> Path:
    """The tiny Gemma 2 as a lone model.onnx (+ data) in `directory`, outside its genai folder."""
    directory.mkdir(parents=True, exist_ok=True)
    src = tiny("genai-fp32")
    for name in (src.name, src.name + ".data"):
        shutil.copy(src.parent / name, directory / name)
    return directory / src.name


def readme_api_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(tiny, tmp_path, monkeypatch, capsys):
    model = lone_model(tiny, tmp_path)
    assert model.name == "model.onnx"  # the name the example uses
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_api_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "model.q4.report.json").read_text())
    assert (tmp_path / "model.q4.onnx").is_file()
    total = report["totals"]["linears"]
    assert f"{total} linears" in out and "verified: True" in out
    assert f"{total}/{total} linears" in out  # the progress callback saw the end of the run
    assert "gemma2" in out.lower() or report["structure"]["style"] in out
    excluded = [s for s in report["sites"] if s["role"] == "o"]
    assert excluded and all("excluded" in s["transforms"] for s in excluded)


def test_cli_and_api_write_the_same_bytes(tiny, tmp_path):
    model = lone_model(tiny, tmp_path / "in")
    (tmp_path / "api").mkdir(), (tmp_path / "cli").mkdir()
    api_out, cli_out = tmp_path / "api" / "q.onnx", tmp_path / "cli" / "q.onnx"
    report = dfq_onnx.quantize(model, api_out, recipe="cafeq-int3", block_size=64, verify="none")
    flags = ["--recipe", "cafeq-int3", "--block-size", "64", "--verify", "none", "--quiet"]
    assert main(["optimize", str(model), "-o", str(cli_out), *flags]) == 0
    for name in ("q.onnx", "q.onnx.data"):
        assert (api_out.parent / name).read_bytes() == (cli_out.parent / name).read_bytes(), name
    assert isinstance(report, dfq_onnx.Report)
    assert {s.block_size for s in report.sites} == {64} and {s.bits for s in report.sites} == {3}


def test_recipe_object_and_progress_callback(tiny, tmp_path):
    model = lone_model(tiny, tmp_path / "in")
    seen = []
    recipe = load_recipe("rtn-int4")
    report = dfq_onnx.quantize(model, tmp_path / "o.onnx", recipe=recipe, verify="none", progress=lambda *a: seen.append(a))
    done = [d for _, d, _ in seen]
    assert done == sorted(done) and done[-1] == seen[-1][2] == len(report.sites)
    assert report.recipe["method"]["name"] == "rtn"


def test_api_errors_are_dfq_errors(tiny, tmp_path):
    model = lone_model(tiny, tmp_path / "in")
    with pytest.raises(dfq_onnx.DfqError, match="unknown setting.*bitz"):
        dfq_onnx.quantize(model, tmp_path / "o.onnx", bitz=4)
    with pytest.raises(dfq_onnx.DfqError, match="unsupported --bits 5"):
        dfq_onnx.quantize(model, tmp_path / "o.onnx", bits=5)
    with pytest.raises(dfq_onnx.DfqError, match="device 'tpu'"):
        dfq_onnx.quantize(model, tmp_path / "o.onnx", device="tpu")
    assert not (tmp_path / "o.onnx").exists()


def test_sigterm_handler_is_restored(tiny, tmp_path):
    """The run turns SIGTERM into an interrupt (resumable) and gives the caller's handler back."""
    model = lone_model(tiny, tmp_path / "in")
    mine = lambda *_: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        during = []
        dfq_onnx.quantize(model, tmp_path / "o.onnx", method="rtn", verify="none", progress=lambda *_: during.append(signal.getsignal(signal.SIGTERM)))
        assert during and all(h is signal.default_int_handler for h in during)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_inspect_returns_the_structure(tiny):
    sites = dfq_onnx.inspect(tiny("genai-fp32"))
    assert len(sites.layers()) == 2
    assert {lin.role.value for lin in sites.linears.values()} >= {"o", "gate", "up", "down"}
    # a genai folder is inspected through its decoder
    assert dfq_onnx.inspect(tiny("genai-fp32").parent).linears.keys() == sites.linears.keys()


def test_default_output_names_agree_for_a_model_and_a_folder(tiny, tmp_path):
    """One naming rule: <model>.<suffix>.onnx for a lone model, <folder>-<suffix>/ for a genai folder,
    with the suffix `float` where --bits 16 writes float weights."""
    model = lone_model(tiny, tmp_path / "lone")
    folder = tmp_path / "folder"
    shutil.copytree(tiny("genai-fp32").parent, folder, ignore=shutil.ignore_patterns("cache"))
    for flags, suffix in ((["--bits", "16"], "float"), (["--format", "qdq", "--bits", "8"], "qdq8")):
        common = ["--method", "rtn", "--verify", "none", "--quiet"] if suffix != "float" else ["--verify", "none", "--quiet"]
        assert main(["optimize", str(model), *flags, *common]) == 0
        assert (model.parent / f"model.{suffix}.onnx").is_file(), sorted(p.name for p in model.parent.iterdir())
        assert main(["optimize", str(folder), *flags, *common]) == 0
        assert (tmp_path / f"folder-{suffix}" / "model.onnx").is_file(), sorted(p.name for p in tmp_path.iterdir())


def test_every_recipe_option_is_a_flag_and_an_api_keyword():
    """The CLI's flags and the API's keywords come from one table: each option parses from its flag
    to its name, and a name outside the table is refused by the API with the list of names."""
    from dfq_onnx.front.api import OVERRIDES
    from dfq_onnx.front.cli import build_parser
    from dfq_onnx.front.options import RECIPE_OPTIONS, recipe_overrides

    args = build_parser().parse_args(["optimize", "m.onnx", "--bits", "3", "--asymmetric", "--format", "qdq", "--lm-head", "int8",
                                      "--method", "rtn", "--online", "none", "--exclude", "o", "--accuracy-level", "4",
                                      "--seed", "5", "--fast", "--block-size", "64", "--statistics", "generated"])  # fmt: skip
    got = recipe_overrides(args)
    assert set(got) == set(OVERRIDES) == {o.name for o in RECIPE_OPTIONS}
    assert got == {"bits": 3, "block_size": 64, "symmetric": False, "output_format": "qdq", "lm_head": "int8", "method": "rtn",
                   "online": "none", "exclude": "o", "accuracy_level": 4, "seed": 5, "fast": True, "statistics": "generated"}  # fmt: skip
    assert all(v is None for v in recipe_overrides(build_parser().parse_args(["optimize", "m.onnx"])).values())
    with pytest.raises(dfq_onnx.DfqError, match="unknown setting.*bits"):
        dfq_onnx.quantize("m.onnx", bitz=3)
