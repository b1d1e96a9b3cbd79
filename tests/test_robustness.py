"""Robustness: seeded bad inputs, bad output paths, odd graphs, bad settings and process faults.

Every case runs the real command line in a subprocess (real stderr, exit codes and signals) and
holds it to one contract:

- a refusal exits non-zero with exactly one stderr line, starting with "dfq-onnx:", that names the
  problem, and leaves no model, data file, report or work directory at the output;
- a success exits 0 with an output that ONNX Runtime loads;
- either way the input model and its data keep their bytes.

Inputs are copies of the tiny Gemma 2 (`tiny("dynamo")`), edited with `onnx` and saved with external
data; the fixture itself is never touched. Round-to-nearest is used wherever the method is not the
point; the default method only for the degenerate weights it has to fall back on.

Each run pays the command's start-up (about 4 s of CPU, mostly importing torch), so the default
selection tests each guard once; `pytest -m slow` adds the variants, the signals and resumes, and
the concurrent runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import file_digests

REPO = Path(__file__).resolve().parents[1]
SEED = 20250611
TIMEOUT = 600
RTN = ("--method", "rtn", "--quiet")
ROLES = ("q", "k", "v", "o", "gate", "up", "down")  # the linears of one layer, in graph order

# Runs the command line with one test hook (argv[1]) that needs a precise moment in the run:
#   checkpoint  pause after the first layer's checkpoint is on disk
#   publish     pause when the finished files are about to be moved into place
#   work        record (a file) that the rounding method was asked for, i.e. work began
# A paused run touches <marks>/paused and waits for <marks>/go (or for a signal).
HOOK = r"""
import sys, time
from pathlib import Path

point, marks = sys.argv[1], Path(sys.argv[2])
del sys.argv[1:3]
sys.argv[0] = "dfq-onnx"
from dfq_onnx.run import checkpoint
from dfq_onnx.front import cli
from dfq_onnx import methods
from dfq_onnx.graph import save


def pause():
    (marks / "paused").touch()
    deadline = time.monotonic() + 300
    while not (marks / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


if point == "checkpoint":
    real_save = checkpoint.save

    def hooked_save(work, state):
        real_save(work, state)
        if state.units_done == 1:
            pause()

    checkpoint.save = hooked_save
elif point == "publish":
    real_publish = save.publish

    def hooked_publish(*args, **kwargs):
        pause()
        return real_publish(*args, **kwargs)

    save.publish = hooked_publish
elif point == "work":
    real_method_for = methods.method_for

    def hooked_method_for(*args, **kwargs):
        (marks / "work-started").touch()
        return real_method_for(*args, **kwargs)

    methods.method_for = hooked_method_for
else:
    raise SystemExit(f"unknown hook point {point}")
sys.exit(cli.main())
"""


# -- running and checking


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dfq_onnx.front.cli", *map(str, args)]


def hooked(point: str, marks: Path, *args: str) -> list[str]:
    marks.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-c", HOOK, point, str(marks), *map(str, args)]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not marker.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {marker.name}: {err.strip()[-2000:]}")
        assert time.monotonic() < deadline, f"no {marker.name} after {seconds} s"
        time.sleep(0.02)


@dataclasses.dataclass
class Case:
    """One run's input and output, and what existed before it."""

    model: Path
    out: Path
    before: dict[str, str]
    existed: set[Path]

    @classmethod
    def of(cls, model: Path, out: Path) -> "Case":
        case = cls(model, out, file_digests(model) if model.is_file() else {}, set())
        case.existed = {p for p in case.output_files() + [case.work] if p.exists() or p.is_symlink()}
        return case

    @property
    def data(self) -> Path:
        return self.out.parent / f"{self.out.name}.data"

    @property
    def report(self) -> Path:
        return self.out.with_name(self.out.stem + ".report.json")

    @property
    def work(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial"

    def output_files(self) -> list[Path]:
        return [self.out, self.data, self.report]


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def refused_line(proc, case: Case, needles=(), absent=(), keep_work: bool = False) -> str:
    """The checks of a refusal: non-zero exit, one stderr line, nothing left at the output."""
    err = proc.stderr.strip()
    how = "killed by a signal" if proc.returncode < 0 else "a refusal was expected"
    assert proc.returncode > 0, f"exit {proc.returncode} ({how}); stderr: {err[-3000:]}"
    lines = _lines(proc.stderr)
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err[-3000:]}"
    line = lines[0]
    assert line.startswith("dfq-onnx:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    for word in absent:
        assert word not in line, f"{word!r} should not be in: {line}"
    for path in case.output_files():
        assert path in case.existed or not path.exists(), f"{path.name} left at the output after a failure: {line}"
    if not keep_work:
        assert case.work in case.existed or not case.work.exists(), f"{case.work.name} left behind: {line}"
    return line


def loads_in_ort(case: Case, proc) -> None:
    assert proc.returncode == 0, proc.stderr.strip()[-3000:]
    assert case.out.is_file(), f"exit 0 but no {case.out.name}"
    ort.InferenceSession(str(case.out), providers=["CPUExecutionProvider"])
    assert not case.work.exists(), "the work directory stays after a published run"


def expect(proc, case: Case, ok: bool | None, needles=(), absent=(), keep_work: bool = False) -> str | None:
    """ok: True must succeed, False must refuse, None either. Returns the refusal line (None on success)."""
    if case.before:
        assert file_digests(case.model) == case.before, "the input or its data changed"
    if ok is None:
        ok = proc.returncode == 0
    if ok:
        loads_in_ort(case, proc)
        return None
    return refused_line(proc, case, needles, absent, keep_work)


def fresh_out(tmp_path: Path) -> Path:
    """out.onnx in a directory of its own, apart from the input."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "out.onnx"


def optimize(model: Path, out: Path, *flags: str, rtn: bool = True, prefix=(), **kwargs):
    """One `optimize` run (round-to-nearest unless told otherwise) and the Case that checks it."""
    case = Case.of(model, out)
    argv = command("optimize", model, "-o", out, *(RTN if rtn else ("--quiet",)), *flags)
    return case, run([*prefix, *argv], **kwargs)


def optimize_edited(m: onnx.ModelProto, tmp_path: Path, *flags: str, rtn: bool = True):
    """The edited model saved under tmp_path/in, optimised into tmp_path/out."""
    return optimize(save(m, tmp_path / "in"), fresh_out(tmp_path), *flags, rtn=rtn)


# -- inputs


def copy_tiny(tiny, directory: Path, name: str = "model.onnx") -> Path:
    """The fixture's model and data copied into `directory` (the model renamed to `name`)."""
    src = tiny("dynamo")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, directory / name)
    shutil.copy(src.parent / "model.onnx.data", directory / "model.onnx.data")
    return directory / name


@pytest.fixture(scope="module")
def base(tiny) -> onnx.ModelProto:
    """The fixture's graph with its weights in memory; every edit works on a copy."""
    return onnx.load(str(tiny("dynamo")))


def edited(base: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(base)
    return m


def save(m: onnx.ModelProto, directory: Path, name: str = "model.onnx") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    onnx.save_model(
        m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=f"{name}.data", size_threshold=1024,
    )  # fmt: skip
    return path


def initializer(m: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def weight(m: onnx.ModelProto, role: str, layer: int) -> str:
    """The initializer of one linear, found by structure: MatMuls reading a 2-D float initializer."""
    inits = {t.name: t for t in m.graph.initializer}
    names = [
        n.input[1] for n in m.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == TensorProto.FLOAT
    ]  # fmt: skip
    assert len(names) == 2 * len(ROLES), names
    return names[layer * len(ROLES) + ROLES.index(role)]


def array(m: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(initializer(m, name))


def replace(m: onnx.ModelProto, name: str, tensor: TensorProto) -> None:
    initializer(m, name).CopyFrom(tensor)


def put(m: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    replace(m, name, numpy_helper.from_array(values, name))


def consumer(m: onnx.ModelProto, value: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if value in n.input)


def extra_matmul(m: onnx.ModelProto, w: np.ndarray) -> None:
    """A second graph output, MatMul(logits, W): a valid graph with an odd weight in it."""
    m.graph.initializer.append(numpy_helper.from_array(w, "odd_weight"))
    m.graph.node.append(helper.make_node("MatMul", ["logits", "odd_weight"], ["odd_out"], name="odd_matmul"))
    m.graph.output.append(helper.make_tensor_value_info("odd_out", TensorProto.FLOAT, None))


def slow(*values, id=None):
    """A parameter set that runs only with `-m slow`."""
    return pytest.param(*values, id=id, marks=pytest.mark.slow)


def rng(case: int) -> np.random.Generator:
    return np.random.default_rng([SEED, case])


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """An uninterrupted round-to-nearest run: the bytes a resumed run must give, and a quantized model."""
    root = tmp_path_factory.mktemp("reference")
    case, proc = optimize(copy_tiny(tiny, root / "in"), fresh_out(root))
    assert proc.returncode == 0, proc.stderr
    return case.out


def same_bytes(out: Path, reference: Path) -> None:
    for name in (reference.name, f"{reference.name}.data"):
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name


# -- file level


def _file_case(tmp_path, tiny, kind: str) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    model = d / "model.onnx"
    if kind == "empty":
        model.write_bytes(b"")
    elif kind == "random-bytes":
        model.write_bytes(rng(1).bytes(4096))
    elif kind == "truncated-model":
        src = tiny("dynamo").read_bytes()
        model.write_bytes(src[: len(src) // 2])
        shutil.copy(tiny("dynamo").parent / "model.onnx.data", d / "model.onnx.data")
    return model


@pytest.mark.parametrize("kind", ["empty", slow("random-bytes"), slow("truncated-model")])
def test_unreadable_model_file(tiny, tmp_path, kind):
    model = _file_case(tmp_path, tiny, kind)
    case, proc = optimize(model, fresh_out(tmp_path))
    expect(proc, case, ok=False, needles=[str(model), "not a readable ONNX model"], absent=[".partial"])


def test_missing_external_data(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    (model.parent / "model.onnx.data").unlink()
    case, proc = optimize(model, tmp_path / "out.onnx")
    expect(proc, case, ok=False, needles=["model.onnx.data", "missing"])


@pytest.mark.slow
def test_truncated_external_data(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    data = model.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size * 2 // 3])
    case, proc = optimize(model, tmp_path / "out.onnx")
    expect(proc, case, ok=False, needles=["model.onnx.data", "truncated"])


def test_garbage_external_data(tiny, base, tmp_path):
    """Random bytes of the right size: float32 words with an all-ones exponent are NaN or Inf."""
    model = copy_tiny(tiny, tmp_path / "in")
    data = model.parent / "model.onnx.data"
    data.write_bytes(rng(2).bytes(data.stat().st_size))
    case, proc = optimize(model, tmp_path / "out.onnx")
    line = expect(proc, case, ok=False)
    external = [t.name for t in onnx.load(str(model), load_external_data=False).graph.initializer if t.data_location == 1]
    assert any(f"'{name}'" in line or name in line.split() for name in external), f"names no initializer: {line}"


def test_external_data_is_a_directory(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    data = model.parent / "model.onnx.data"
    data.unlink()
    data.mkdir()
    case, proc = optimize(model, tmp_path / "out.onnx")
    expect(proc, case, ok=False, needles=["model.onnx.data", "directory"])


@pytest.mark.slow
def test_model_path_is_a_directory(tmp_path):
    model = tmp_path / "model.onnx"
    model.mkdir()
    case, proc = optimize(model, tmp_path / "out.onnx")
    expect(proc, case, ok=False, needles=[str(model), "is a directory"])


def test_unicode_and_spaces_in_paths(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "модель с пробелами ü", name="мой model.onnx")
    out = tmp_path / "выход ✓ dir" / "ответ q4 é.onnx"
    out.parent.mkdir()
    case, proc = optimize(model, out)
    expect(proc, case, ok=True)
    assert json.loads(case.report.read_text())  # the report landed beside it, readable


# -- output paths


def _read_only_runner(directory: Path) -> list[str]:
    """The argv prefix that makes `directory` unwritable for the run.

    Not root: mode 0555 is enough. Root writes through permission bits, so the run gets its own
    mount namespace where the directory is a read-only bind mount of itself; where that is not
    permitted, the case cannot be made and is skipped.
    """
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if not shutil.which("unshare"):
        pytest.skip("running as root (permission bits do not stop root) and unshare(1) is not installed")
    wrap = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory)]
    probe = subprocess.run([*wrap, "sh", "-c", 'touch "$0"/probe', str(directory)], capture_output=True, text=True)
    if probe.returncode == 0 or (directory / "probe").exists():
        pytest.skip("running as root: the read-only bind mount did not make the directory unwritable")
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"running as root and a read-only bind mount is not permitted here: {probe.stderr.strip()[:200]}")
    return wrap


def test_output_directory_not_writable(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    ro = tmp_path / "readonly"
    ro.mkdir()
    prefix = _read_only_runner(ro)
    try:
        case, proc = optimize(model, ro / "out.onnx", prefix=prefix)
    finally:
        ro.chmod(0o755)
    expect(proc, case, ok=False, needles=[str(ro)], absent=["Traceback"])


def test_output_parent_is_a_file(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a directory\n")
    case, proc = optimize(model, notes / "out.onnx")
    expect(proc, case, ok=False, needles=["notes.txt"])
    assert notes.read_text() == "a file, not a directory\n"


def test_stale_work_path_is_a_file(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    out = fresh_out(tmp_path)
    stale = out.parent / f".{out.name}.partial"
    stale.write_bytes(rng(3).bytes(100))
    case, proc = optimize(model, out)
    expect(proc, case, ok=None, needles=[stale.name])


@pytest.mark.slow
def test_stale_work_directory_with_junk(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    out = fresh_out(tmp_path)
    stale = out.parent / f".{out.name}.partial"
    stale.mkdir()
    (stale / "checkpoint.json").write_bytes(rng(4).bytes(300))
    (stale / f"{out.name}.data").write_bytes(rng(5).bytes(5000))
    case, proc = optimize(model, out)
    expect(proc, case, ok=True)


def test_output_is_the_input(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    case, proc = optimize(model, model)
    expect(proc, case, ok=False, needles=["is the input model"])


def test_output_is_the_input_data(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    data = model.parent / "model.onnx.data"
    case, proc = optimize(model, data)
    expect(proc, case, ok=False, needles=["model.onnx.data"], absent=["model.onnx.data.data"])


def test_output_directory_missing(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    case, proc = optimize(model, tmp_path / "nowhere" / "out.onnx")
    expect(proc, case, ok=False, needles=["nowhere", "does not exist"])
    assert not case.out.parent.exists()


@pytest.mark.slow
def test_output_is_a_directory(tiny, tmp_path):
    model = copy_tiny(tiny, tmp_path / "in")
    out = tmp_path / "out.onnx"
    out.mkdir()
    case, proc = optimize(model, out)
    expect(proc, case, ok=False, needles=["out.onnx", "is a directory"])


# -- graph mutations

# A refusal of a broken input names the input, never the output or the hidden work directory.
BLAMES_OUTPUT = (".partial", "out.onnx", "written model")


def test_removed_node(base, tmp_path):
    """The norm Mul feeding layer 0's q/k/v is gone: a broken input graph, and said to be one."""
    m = edited(base)
    q = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] == weight(m, "q", 0))
    producer = next(n for n in m.graph.node if q.input[0] in n.output)
    m.graph.node.remove(producer)
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=False, needles=[case.model.name, q.input[0]], absent=BLAMES_OUTPUT)


def test_dangling_input(base, tmp_path):
    m = edited(base)
    o = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] == weight(m, "o", 1))
    o.input[0] = "no_such_tensor"
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=False, needles=[case.model.name, "no_such_tensor"], absent=BLAMES_OUTPUT)


@pytest.mark.parametrize("dtype", ["int64", slow("float64")])
def test_weight_of_another_type(base, tmp_path, dtype):
    """One weight stored as int64 or float64 in a float32 graph."""
    m = edited(base)
    name = weight(m, "q", 0) if dtype == "int64" else weight(m, "o", 0)
    reader = consumer(m, name).name
    values = array(m, name)
    put(m, name, np.round(values * 100).astype(np.int64) if dtype == "int64" else values.astype(np.float64))
    case, proc = optimize_edited(m, tmp_path)
    line = expect(proc, case, ok=None, needles=[case.model.name], absent=BLAMES_OUTPUT)
    if line is not None:  # a refusal says which weight (or the node reading it) and its type
        assert re.search(rf"\b({re.escape(name)}|{re.escape(reader)})\b", line), line
        assert re.search(r"int64" if dtype == "int64" else r"double|float64", line), line


@pytest.mark.slow
def test_bf16_weights(base, tmp_path):
    m = edited(base)
    for name in [weight(m, role, 0) for role in ROLES]:
        values = array(m, name)
        bf16 = helper.make_tensor(name, TensorProto.BFLOAT16, values.shape, values.astype(ml_dtypes.bfloat16).tobytes(), raw=True)
        replace(m, name, bf16)
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=False, needles=["bf16", "fp16 or fp32"])


@pytest.mark.parametrize(
    "shape",
    [slow((500,), id="1-D"), slow((), id="rank-0"), pytest.param((500, 0), id="zero-sized-dim")],
)
def test_odd_weight_shape(base, tmp_path, shape):
    """MatMul(logits, W) as an extra output, W 1-D, a scalar, or [K, 0]."""
    m = edited(base)
    extra_matmul(m, rng(6).standard_normal(shape).astype(np.float32))
    case, proc = optimize_edited(m, tmp_path)
    line = expect(proc, case, ok=None, needles=[case.model.name], absent=BLAMES_OUTPUT)
    if line is not None:
        assert re.search(r"\bodd_(weight|matmul)\b", line), f"names neither the weight nor its MatMul: {line}"


@pytest.mark.slow
def test_three_dimensional_weight(base, tmp_path):
    """Layer 0's q weight as [1, K, N]: MatMul broadcasts it, the graph still computes the same."""
    m = edited(base)
    name = weight(m, "q", 0)
    put(m, name, array(m, name)[None])
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=None, needles=[case.model.name, name], absent=BLAMES_OUTPUT)


@pytest.mark.slow
def test_shared_weight(base, tmp_path):
    """Layer 1's q reads layer 0's q weight."""
    m = edited(base)
    q0, q1 = weight(m, "q", 0), weight(m, "q", 1)
    next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] == q1).input[1] = q0
    m.graph.initializer.remove(initializer(m, q1))
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=None, needles=[case.model.name, q0], absent=BLAMES_OUTPUT)


@pytest.mark.slow
def test_duplicate_initializer(base, tmp_path):
    """Two initializers with one name and different values."""
    m = edited(base)
    name = weight(m, "o", 0)
    shape = array(m, name).shape
    m.graph.initializer.append(numpy_helper.from_array(rng(7).standard_normal(shape).astype(np.float32) * 0.05, name))
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=None, needles=[case.model.name, name], absent=BLAMES_OUTPUT)


def test_no_graph_outputs(base, tmp_path):
    m = edited(base)
    del m.graph.output[:]
    case, proc = optimize_edited(m, tmp_path)
    expect(proc, case, ok=False, needles=[case.model.name, "no graph outputs"], absent=BLAMES_OUTPUT)


@pytest.mark.slow
def test_already_quantized_input(reference, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for p in (reference, reference.parent / f"{reference.name}.data"):
        shutil.copy(p, d / p.name)
    model = d / reference.name
    case, proc = optimize(model, tmp_path / "again.onnx")
    expect(proc, case, ok=False, needles=["already quantized", "MatMulNBits"])


def test_no_matmul(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    (tmp_path / "in").mkdir()
    model = tmp_path / "in" / "relu.onnx"
    onnx.save(helper.make_model(graph), str(model))
    case, proc = optimize(model, tmp_path / "out.onnx")
    expect(proc, case, ok=False, needles=["no weight MatMuls"])


@pytest.mark.parametrize("bad", ["nan", slow("inf")])
def test_non_finite_weight_refused_before_work(base, tmp_path, bad):
    """A NaN or Inf in the last layer's weight is found before the first layer is rounded."""
    m = edited(base)
    name = weight(m, "down", 1) if bad == "nan" else weight(m, "up", 1)
    values = array(m, name).copy()
    r = rng(8)
    values[r.integers(values.shape[0]), r.integers(values.shape[1])] = np.nan if bad == "nan" else np.inf
    put(m, name, values)
    model = save(m, tmp_path / "in")
    case = Case.of(model, fresh_out(tmp_path))
    marks = tmp_path / "marks"
    proc = run(hooked("work", marks, "optimize", model, "-o", case.out, *RTN))
    line = expect(proc, case, ok=False, needles=[name])
    assert bad in line.lower(), line
    assert not (marks / "work-started").exists(), "the refusal came after rounding had begun"


def _degenerate(base, tmp_path, kind: str) -> tuple[Case, subprocess.CompletedProcess]:
    m = edited(base)
    r = rng(9)
    if kind == "zeros":
        name = weight(m, "o", 0)
        put(m, name, np.zeros_like(array(m, name)))
    elif kind == "constant-column":
        name = weight(m, "gate", 0)
        values = array(m, name).copy()
        values[:, r.integers(values.shape[1])] = 0.05
        put(m, name, values)
    else:
        name = weight(m, "down", 1)
        k, n = array(m, name).shape
        put(m, name, np.outer(r.standard_normal(k), r.standard_normal(n)).astype(np.float32) * 0.02)
    return optimize_edited(m, tmp_path, rtn=False)  # the default method


def dequantized_matmulnbits(model: Path, initializer_name: str) -> np.ndarray:
    """The 4-bit symmetric MatMulNBits weight written for `initializer_name`, decoded here from its
    bytes ((code - 8) * scale per block, low nibble first): [N, K padded to the block]."""
    m = onnx.load(str(model))
    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    node = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(f"{initializer_name}_Q4"))
    b, scales = arrays[node.input[1]], arrays[node.input[2]]
    codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[0], b.shape[1], -1).astype(np.float32)
    return ((codes - 8) * scales.reshape(b.shape[0], b.shape[1], 1)).reshape(b.shape[0], -1)


def test_all_zero_o_weight_default_method(base, tmp_path):
    """The V/O pair's algebra stays defined (a ridge) for an all-zero o: the run verifies, and o is
    written as zeros."""
    case, proc = _degenerate(base, tmp_path, "zeros")
    expect(proc, case, ok=True)
    w = dequantized_matmulnbits(case.out, weight(edited(base), "o", 0))
    assert w.shape[0] == 128 and not np.any(w), np.abs(w).max()
    assert np.any(dequantized_matmulnbits(case.out, weight(edited(base), "o", 1)))  # the decoding reads real bytes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["constant-column", "rank-1"])
def test_degenerate_weight_default_method(base, tmp_path, kind):
    case, proc = _degenerate(base, tmp_path, kind)
    expect(proc, case, ok=True)


# -- command line and recipe values


@pytest.mark.parametrize(
    "flags,needles",
    [
        pytest.param(["--bits", "7"], ["--bits 7"], id="bits-7"),
        slow(["--block-size", "24"], ["--block-size 24"], id="block-24"),
        slow(["--block-size", "1024"], ["--block-size 1024"], id="block-1024"),
        pytest.param(["--bits", "four"], ["--bits", "four"], id="bits-not-a-number"),
    ],
)
def test_bad_flag_value(tiny, tmp_path, flags, needles):
    model = copy_tiny(tiny, tmp_path / "in")
    case, proc = optimize(model, tmp_path / "out.onnx", *flags)
    expect(proc, case, ok=False, needles=needles)


RECIPES = {
    "block-size-string": ('[quant]\nbits = 4\nblock_size = "32"\n', "block_size", r"\b(int|integer)\b"),
    "bits-string": ('[quant]\nbits = "4"\n', "bits", r"\b(int|integer)\b"),
    "accuracy-level-string": ('[output]\naccuracy_level = "high"\n', "accuracy_level", r"\b(int|integer)\b"),
    "symmetric-string": ('[quant]\nsymmetric = "yes"\n', "symmetric", r"\b(true or false|bool|boolean)\b"),
    "unknown-key": ("[quant]\nbits = 4\nblock = 32\n", "block", r"unknown key"),
}


@pytest.mark.parametrize("which", [w if w == "block-size-string" else slow(w) for w in RECIPES])
def test_bad_recipe_value(tiny, tmp_path, which):
    text, key, expected = RECIPES[which]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    model = copy_tiny(tiny, tmp_path / "in")
    case, proc = optimize(model, tmp_path / "out.onnx", "--recipe", recipe)
    line = expect(proc, case, ok=False, needles=[key])
    detail = line.replace(str(recipe), "")
    assert re.search(expected, detail), f"does not say what {key} should be: {line}"


def test_seed_out_of_range_is_a_usage_error(tiny, tmp_path):
    # --seed picks the random rotations of --recipe random-rotation; a seed torch cannot take is refused up front.
    model = copy_tiny(tiny, tmp_path / "in")
    case, proc = optimize(model, fresh_out(tmp_path), "--seed", "99999999999999999999")
    expect(proc, case, ok=False, needles=["--seed", "out of range"])


# -- process faults


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("point", ["checkpoint", "publish"], ids=["during-work", "before-publish"])
def test_interrupted_then_resumed(tiny, reference, tmp_path, sig, point):
    model = copy_tiny(tiny, tmp_path / "in")
    case = Case.of(model, fresh_out(tmp_path))
    marks = tmp_path / "marks"
    proc = start(hooked(point, marks, "optimize", model, "-o", case.out, *RTN))
    wait_for(marks / "paused", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert file_digests(model) == case.before
        for path in case.output_files():
            assert not path.exists(), f"{path.name} left at the output by a killed run"
    else:
        line = expect(done, case, ok=False, needles=["--resume"], keep_work=True)
        assert proc.returncode == 130, line
    assert (case.work / "checkpoint.json").is_file(), "the finished layers were not kept"

    _, resumed = optimize(model, case.out, "--resume")
    expect(resumed, case, ok=True)
    assert json.loads(case.report.read_text())["resumed_units"] >= 1
    same_bytes(case.out, reference)


@pytest.mark.slow
def test_two_runs_on_one_output(tiny, reference, tmp_path):
    """The second run refuses while the first is writing; the first publishes whole files."""
    model = copy_tiny(tiny, tmp_path / "in")
    case = Case.of(model, fresh_out(tmp_path))
    marks = tmp_path / "marks"
    first = start(hooked("checkpoint", marks, "optimize", model, "-o", case.out, *RTN))
    try:
        wait_for(marks / "paused", first)
        second_case, second = optimize(model, case.out)
        expect(second, second_case, ok=False, needles=["another dfq-onnx run is writing", case.out.name, f"(pid {first.pid})"])
        assert (case.work / "checkpoint.json").is_file(), "the second run disturbed the first one's work"
    finally:
        (marks / "go").touch()
        _, err = first.communicate(timeout=TIMEOUT)
    expect(subprocess.CompletedProcess(first.args, first.returncode, "", err), case, ok=True)
    same_bytes(case.out, reference)


def _file_size_limit(limit: int):
    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead

    return limit_writes


@pytest.mark.parametrize(
    "limit,verify",
    [
        pytest.param(64 << 10, "none", id="quantized-layers"),
        # Past one layer's checkpoint (~120 KiB of packed codes and scales), so the first write that
        # fails is the output data file's second layer, inside the graph pass that emits it.
        pytest.param(160 << 10, "none", id="inside-a-graph-pass"),
        slow(400 << 10, "none", id="float-tensor-copy"),
        slow(64 << 10, "auto", id="verification-copies"),
    ],
)
def test_file_size_limit_during_the_write(tiny, tmp_path, limit, verify):
    """The checkpoint (64 KiB), the output's data file (160 KiB: while a pass emits a layer; 400 KiB: in
    the copy of the float embedding) or the float copies verification builds beside it (auto) cannot
    grow past the limit."""
    model = copy_tiny(tiny, tmp_path / "in")
    case, proc = optimize(model, fresh_out(tmp_path), "--verify", verify, preexec_fn=_file_size_limit(limit))
    expect(proc, case, ok=False, needles=["no space left while writing", "nothing was published"])
