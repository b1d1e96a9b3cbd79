"""The models an evaluation compares: .onnx files or onnxruntime-genai folders, run in ONNX Runtime
(CPU) the way `verify` feeds any export, and the reference's tokenizer and first token."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import DfqError
from ..front import genai_folder
from ..run import verify
from . import head


@dataclasses.dataclass
class Model:
    label: str  # as the user named it
    path: Path  # the .onnx file
    folder: Path  # where its config and tokenizer files are
    session: object
    head_dim: int | None = None
    windows: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def inputs(self) -> list[str]:
        return [i.name for i in self.session.get_inputs() if i.name != head.POSITIONS]

    @property
    def positioned(self) -> bool:
        """Whether the head runs only at the positions asked for (see evaluation/head.py)."""
        return any(i.name == head.POSITIONS for i in self.session.get_inputs())

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """[batch, seq, vocab] float32 logits for full sequences, no cache (empty past caches)."""
        if self.positioned:
            return self.logits_at(ids, np.arange(ids.size)).reshape(*ids.shape, -1)
        feed = verify.feeds(self.session, ids, self.head_dim, self.windows)
        return verify.logits_of(self.session, feed, self.label)

    def logits_at(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """[len(positions), vocab] float32 logits at `positions`, indices into the flattened
        [batch * seq] positions of `ids`; the head runs only there when the graph allows it."""
        positions = np.asarray(positions, np.int64)
        if not self.positioned:
            return self.logits(ids).reshape(ids.size, -1)[positions]
        feed = verify.feeds(_Inputs(self.session), ids, self.head_dim, self.windows)
        feed[head.POSITIONS] = positions
        return verify.logits_of(self.session, feed, self.label)[0]

    def cache_outputs(self) -> dict[str, str] | None:
        """Past cache input -> its present output, when the graph returns every cache it takes and
        none has a fixed capacity (sliding windows as onnxruntime-genai allocates them); else None."""
        pasts = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        outputs = {o.name for o in self.session.get_outputs()}
        if not pasts or self.windows:
            return None
        names = {p: p.replace("past_key_values", "present", 1) if p.startswith("past_key_values") else "present_" + p[5:] for p in pasts}
        return names if set(names.values()) <= outputs else None

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray] | None, at: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Feed `ids` [batch, new] after the cached `past` (None: the start); returns the logits at
        `at` (indices into the flattened [batch * new] positions; by default each row's last)
        [len(at), vocab], and the caches to pass to the next step."""
        names = self.cache_outputs()
        if names is None:
            raise DfqError(f"{self.label} has no KV cache this evaluation can feed")
        batch, new = ids.shape
        feed = verify.feeds(_Inputs(self.session), ids, self.head_dim, self.windows)
        done = 0
        if past:
            feed.update(past)
            done = next(iter(past.values())).shape[2]
        for name, value in list(feed.items()):
            if name == "attention_mask":
                feed[name] = np.ones((batch, done + new), value.dtype)
            elif name == "position_ids":
                feed[name] = np.broadcast_to(np.arange(done, done + new, dtype=value.dtype), (batch, new)).copy()
            elif name == "cache_position":
                feed[name] = np.arange(done, done + new, dtype=value.dtype)
        at = np.arange(batch, dtype=np.int64) * new + new - 1 if at is None else np.asarray(at, np.int64)
        if self.positioned:
            feed[head.POSITIONS] = at
        outputs = [verify.logits_name(self.session), *names.values()]
        try:
            logits, *presents = self.session.run(outputs, feed)
        except Exception as exc:
            raise DfqError(f"ONNX Runtime cannot run {self.label}: {verify.first_line(exc)}") from None
        logits = logits.astype(np.float32).reshape(-1, logits.shape[-1])
        if not self.positioned:
            logits = logits[at]
        return logits, dict(zip(names, presents))


class _Inputs:
    """A session as `verify.feeds` sees it: its inputs without the positions (fed separately)."""

    def __init__(self, session):
        self._session = session

    def get_inputs(self):
        return [i for i in self._session.get_inputs() if i.name != head.POSITIONS]


def release_memory() -> None:
    """Hand freed memory back to the system (glibc's malloc_trim; nothing elsewhere). ONNX Runtime's
    buffers for hundreds of input shapes otherwise stay with the process: an evaluation of three
    Gemma 3 270M models on tasks grew past 20 GB without it and stays near 4 GB with it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve(model: str | Path) -> tuple[Path, Path]:
    """(the .onnx file, its folder) of an .onnx path or an onnxruntime-genai folder."""
    path = Path(model)
    if not path.exists():
        raise DfqError(f"model {path} does not exist; give an .onnx file or an onnxruntime-genai model folder")
    folder = genai_folder.find(path)
    if folder is not None:
        return folder.model, folder.root
    if path.is_dir() or path.suffix != ".onnx":
        raise DfqError(f"{path} is not an .onnx file; give an .onnx file or an onnxruntime-genai model folder")
    return path, path.parent


def load(model: str | Path, threads: int | None = None, like: Model | None = None) -> Model:
    """A session of `model`; with `like` (the reference), its graph inputs must be the reference's
    and it is fed with the reference's cache layout."""
    path, folder = resolve(model)
    layout = None if like is not None else _cache_layout(path, folder)
    copy = _positioned_copy(path, layout and layout[2])
    try:
        sess = verify.session(path, threads=threads, label=str(model), serialized=copy)
    except DfqError:
        if copy is None:
            raise
        sess = verify.session(path, threads=threads, label=str(model))  # the edited copy did not load: run it whole
    m = Model(str(model), path, folder, sess)
    if like is not None:
        if sorted(m.inputs) != sorted(like.inputs):
            raise DfqError(
                f"candidate {model} has graph inputs ({', '.join(m.inputs)}) that differ from the reference's "
                f"({', '.join(like.inputs)}); compare exports of the same kind"
            )
        m.head_dim, m.windows = like.head_dim, like.windows
        return m
    m.head_dim, m.windows = layout[:2]
    return m


def _positioned_copy(path: Path, lm_head: str | None) -> bytes | None:
    """The graph with its head at chosen positions (evaluation/head.py), or None to run it as it is."""
    try:
        return head.session_bytes(path, lm_head)
    except Exception:  # noqa: BLE001 (a graph this edit does not fit, or over protobuf's 2 GB: run it whole)
        return None


def _cache_layout(path: Path, folder: Path) -> tuple[int | None, dict[str, int], str | None]:
    """Head size, fixed-capacity sliding-window caches (as `verify` feeds them) and the lm_head's node."""
    try:
        from ..graph import load
        from ..graph.sites import find_sites

        sites = find_sites(load.load_model(path))
        return verify.head_dim_of(sites), dict(sites.kv_windows or {}), sites.lm_head
    except Exception:  # an architecture the quantizer does not read can still be evaluated
        decoder = _config(folder).get("model", {}).get("decoder", {})
        size = decoder.get("head_size")
        return (size if isinstance(size, int) else None), {}, None


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / genai_folder.CONFIG).read_text())
    except (OSError, ValueError):
        return {}


def context_length(folder: Path) -> int | None:
    """The longest sequence the model takes: genai_config.json's context_length, else config.json's
    max_position_embeddings; None if neither says."""
    value = _config(folder).get("model", {}).get("context_length")
    if not isinstance(value, int):
        try:
            value = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            value = None
    return value if isinstance(value, int) and value > 1 else None


def bos_token_id(folder: Path) -> int | None:
    """bos_token_id from genai_config.json or config.json beside the model; None if neither says."""
    candidates = [_config(folder).get("model", {})]
    try:
        candidates.append(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError):
        pass
    for config in candidates:
        value = config.get("bos_token_id") if isinstance(config, dict) else None
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
            return value
    return None


class Tokenizer:
    """encode(text) -> token ids, without special tokens: tokenizer.json (the `tokenizers` package),
    else the folder's Hugging Face tokenizer (transformers)."""

    def __init__(self, folder: Path, label: str):
        self._tok = self._hf = None
        if (folder / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer as Fast
            except ImportError:
                raise DfqError("reading tokenizer.json needs the tokenizers package: pip install tokenizers") from None
            try:
                self._tok = Fast.from_file(str(folder / "tokenizer.json"))
            except Exception as exc:
                raise DfqError(f"cannot read {folder / 'tokenizer.json'}: {verify.first_line(exc)}") from None
        elif (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.model").is_file():
            try:
                from transformers import AutoTokenizer

                self._hf = AutoTokenizer.from_pretrained(str(folder))
            except Exception as exc:
                raise DfqError(f"cannot load the tokenizer in {folder}: {verify.first_line(exc)}") from None
        else:
            raise DfqError(
                f"no tokenizer beside the reference {label} (tokenizer.json, or a Hugging Face tokenizer in {folder}); "
                "text and tasks need one: use an onnxruntime-genai folder, or put the tokenizer files beside the model"
            )

    def encode(self, text: str) -> list[int]:
        if self._tok is not None:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        return list(self._hf.encode(text, add_special_tokens=False))
