"""onnxruntime-genai model folders in and out: a folder (genai_config.json, the decoder .onnx and
its data, tokenizer and processor files) is quantized into a new folder that onnxruntime-genai
loads as it is. The input folder is never modified.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import DfqError

CONFIG = "genai_config.json"


@dataclasses.dataclass(frozen=True)
class GenaiFolder:
    root: Path
    config: dict
    model_file: str  # the decoder's file name, as genai_config.json names it

    @property
    def model(self) -> Path:
        return self.root / self.model_file


def find(path: Path) -> GenaiFolder | None:
    """The genai folder `path` is, or whose decoder `path` is; None for a lone model file."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise DfqError(f"{path} is a directory without {CONFIG}; give the .onnx file or an onnxruntime-genai model folder")
        folder = _read(path)
        if not folder.model.is_file():
            raise DfqError(f"{path / CONFIG} names the decoder '{folder.model_file}', which is not in {path}")
        return folder
    if not (path.parent / CONFIG).is_file():
        return None
    folder = _read(path.parent)
    return folder if folder.model_file == path.name else None


def _read(root: Path) -> GenaiFolder:
    try:
        config = json.loads((root / CONFIG).read_text())
        name = config["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DfqError(f"cannot read the decoder's file name from {root / CONFIG} ({exc!s}); fix or remove it") from None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise DfqError(f"{root / CONFIG}: model.decoder.filename must be a file name in that folder, not {name!r}")
    return GenaiFolder(root, config, name)


def output_folder(folder: GenaiFolder, output: Path | None, suffix: str) -> Path | None:
    """Where a folder output goes: `-o DIR`, or beside the input folder by default. None when `-o`
    names an .onnx file: then the model alone is written (as for any lone model)."""
    if output is not None and Path(output).suffix == ".onnx":
        return None
    out = Path(output) if output is not None else folder.root.with_name(f"{folder.root.name}-{suffix}")
    if out.exists() and not out.is_dir():
        raise DfqError(f"output {out} is a file; give a folder for an onnxruntime-genai model, or a path ending in .onnx")
    if out.resolve() == folder.root.resolve():
        raise DfqError(f"output folder {out} is the input folder, which is never modified; choose another -o folder")
    if not out.parent.is_dir():
        raise DfqError(f"output directory {out.parent} does not exist; create it first")
    return out


def companions(folder: GenaiFolder, data_files: set[Path], output_name: str) -> dict[str, Path | bytes]:
    """What the output folder needs besides the model: every other file of the input folder
    (tokenizer, processor, other models and their data) and genai_config.json naming the new model."""
    skip = {folder.model.resolve(), *(p.resolve() for p in data_files)}
    files: dict[str, Path | bytes] = {}
    for entry in sorted(folder.root.iterdir()):
        if entry.name == CONFIG or entry.name.startswith(".") or not entry.is_file() or entry.resolve() in skip:
            continue
        if entry.name.endswith(".report.json"):  # a previous run's report belongs to that run
            continue
        files[entry.name] = entry
    config = json.loads(json.dumps(folder.config))
    config["model"]["decoder"]["filename"] = output_name
    files[CONFIG] = (json.dumps(config, indent=4) + "\n").encode()
    return files
