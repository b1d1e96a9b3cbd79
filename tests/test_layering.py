"""House rules of the architecture: the math (quant/) knows nothing of ONNX."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "dfq_onnx"
FORBIDDEN = ("onnx", "onnx_ir", "onnxruntime", "onnxscript")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_quant_sources_import_no_onnx():
    files = sorted((PACKAGE / "quant").glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.name} imports {bad}"


def test_importing_quant_loads_no_onnx_module():
    """Transitively too: importing every quant module pulls in no ONNX package."""
    modules = [f"dfq_onnx.quant.{p.stem}" for p in (PACKAGE / "quant").glob("*.py") if p.stem != "__init__"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\nprint(bad)\nassert not bad, bad\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_graph_does_no_optimisation():
    """graph/ never imports torch or the math: rewriting is wiring, not deciding."""
    for path in sorted((PACKAGE / "graph").glob("*.py")):
        mods = imported_modules(path)
        assert "torch" not in mods, path.name
        source = path.read_text()
        assert "from ..quant" not in source and "dfq_onnx.quant" not in source, path.name


PASSES = Path(__file__).parents[1] / "passes"


def test_passes_apply_plans_and_decide_nothing():
    """passes/ turn plans into graph edits: no torch, no math; and the seam is plain data (plan.py)."""
    files = sorted(PASSES.glob("*.py"))
    assert len(files) > 3
    for path in [*files, PACKAGE / "plan.py"]:
        mods = imported_modules(path)
        assert "torch" not in mods and not any(m.startswith("dfq_onnx.quant") for m in mods), path.name
        assert not re.search(r"from \.+quant[ .]", path.read_text()), path.name


def test_no_module_grows_past_its_job():
    """Small modules: none of the package's modules (nor a pass) over 400 lines."""
    for path in [*PACKAGE.rglob("*.py"), *PASSES.glob("*.py")]:
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"


def _package_imports(path: Path) -> set[str]:
    """Absolute names of the dfq_onnx modules `path` imports (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names.update([module] + [f"{module}.{a.name}" for a in node.names])
            elif node.module and node.module.startswith("dfq_onnx"):
                names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("dfq_onnx"))
    return names


def test_front_doors_sit_above_the_run_and_the_run_above_the_core():
    """The folders show the architecture: front/ (CLI, API, Olive, genai folders) uses run/ (the
    loop, planning, prior, checkpoints, Ray, budget, verification), which never calls a front door;
    the core (the package's top-level modules, graph/, quant/, passes/) uses neither. evaluation/ may
    read genai folders and run ONNX Runtime sessions the way verification does, nothing else of them;
    run/ may use evaluation's model runner and sampler (the generated statistics sample as `eval` does)
    and its `evaluate` (the report's data-free quality line), nothing else of it."""
    front, run = "dfq_onnx.front", "dfq_onnx.run"
    assert (PACKAGE / "front").is_dir() and (PACKAGE / "run").is_dir()
    core = [*PACKAGE.glob("*.py"), *(PACKAGE / "graph").glob("*.py"), *(PACKAGE / "quant").glob("*.py"), *PASSES.glob("*.py")]
    for path in core:
        if path.parent == PASSES:
            continue  # passes/ is dfq_onnx.passes, resolved below by its own rule
        bad = {m for m in _package_imports(path) if m.startswith((front, run))}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"
    for path in PASSES.glob("*.py"):
        assert not re.search(r"from \.\.(front|run)\b", path.read_text()), path.name
    sampler = {"dfq_onnx.evaluation", "dfq_onnx.evaluation.evaluate", "dfq_onnx.evaluation.models", "dfq_onnx.evaluation.sampling"}
    for path in (PACKAGE / "run").glob("*.py"):
        bad = {m for m in _package_imports(path) if m.startswith(front) or (m.startswith("dfq_onnx.evaluation") and m not in sampler)}
        assert not bad, f"run/{path.name} imports {bad}"
    allowed = {"dfq_onnx.front.genai_folder", "dfq_onnx.run.verify"}
    for path in (PACKAGE / "evaluation").glob("*.py"):
        used = {m for m in _package_imports(path) if m.startswith((front, run))}
        modules = {m for m in used if m in allowed or any(m.startswith(a + ".") for a in allowed)}
        assert used <= modules | {front, run}, f"evaluation/{path.name} imports {used - modules}"


def test_no_module_reads_another_modules_private_names():
    """A leading underscore means "this module's own": no module of the package (nor a pass) imports
    such a name from another module, or reads it through an imported module."""
    sources = [*PACKAGE.rglob("*.py"), *PASSES.glob("*.py")]
    for path in sources:
        tree = ast.parse(path.read_text())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dfq_onnx")):
                for alias in node.names:
                    assert not (alias.name.startswith("_") and not alias.name.startswith("__")), f"{path.name} imports {alias.name}"
                    modules.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reads {node.value.id}.{node.attr}"
